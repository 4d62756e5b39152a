"""``aesthetic`` and ``nsfw``: small heads over the CLIP image embedding, which they read from the
batch (the job's one CLIP pass, see ``filters.clip_score``); they never run the image tower.

    - aesthetic: {checkpoint: sac+logos+ava1-l14-linearMSE.pth, min: 5}
    - nsfw: {checkpoint: hf-hub:OWNER/REPO/clip_autokeras_binary_nsfw.pth, max: 0.5}

``checkpoint`` is a local file (a PyTorch state dict, ``.pth``/``.pt``, or ``.safetensors``) or
``hf-hub:OWNER/REPO/PATH/IN/REPO``, resolved from the local Hugging Face cache (``cache_dir``, else
the standard one; nothing is downloaded: fetch it first with ``huggingface-cli download``). The
head's CLIP is ``model``/``pretrained`` (default OpenAI ViT-L-14, what both published heads were
trained on); ``check()`` refuses a head whose input width is not that CLIP's embedding width.
Both take the L2-normalised image embedding, as their reference code does.

The layouts that load (keys of the state dict; layer widths are read from the weights):

* **aesthetic**: LAION's improved-aesthetic-predictor (``christophschuhmann/improved-aesthetic-predictor``,
  e.g. ``sac+logos+ava1-l14-linearMSE.pth``): ``layers.{0,2,4,6,7}.{weight,bias}``, an
  ``nn.Sequential`` of Linear(768,1024) Dropout Linear(1024,128) Dropout Linear(128,64) Dropout
  Linear(64,16) Linear(16,1), no activations. The score is its output (about 1..10).
* **nsfw**: the PyTorch port of LAION's ``CLIP-based-NSFW-Detector`` autokeras model (as its issue
  #7 and NeMo Curator load it; ``clip_autokeras_binary_nsfw.pth`` for ViT-L/14, 768 wide, the same
  layout for the ViT-B/32 one, 512 wide): ``norm.mean``, ``norm.variance``,
  ``linear_{1..4}.{weight,bias}``: (x - mean) / sqrt(variance), Linear 64, ReLU, Linear 512, ReLU,
  Linear 256, ReLU, Linear 1, sigmoid. The score is the probability of NSFW (0..1). The published
  Keras SavedModel zips themselves do not load here (that would need TensorFlow): use the port.

On a video row the embedding is its clip's mean frame embedding (``filters.frames``, normalised
again). A row cut into scenes (members ``clip_NNN.mp4``) is judged clip by clip, as clip_score
judges it: the head scores each clip clip_score kept (``CLIP_EMBEDDINGS``), ``aesthetic_scores`` /
``nsfw_scores`` hold those scores in member order, the clips that break the rules are dropped
(``frames.keep_clips``: renumbered, the row summed up again) and the row is filtered only when none
is left. The row's ``aesthetic_score`` / ``nsfw_score`` is then its worst kept clip's (the lowest
aesthetic score, the highest NSFW probability: every clip written passes), or, for a filtered row,
its best clip's. ``top_fraction`` counts clips. A row of one clip (a span) keeps one score.

Rules, one convention: ``min`` / ``max`` on the score, and ``top_fraction``: keep the best fraction
of the job (the highest aesthetic scores, the lowest NSFW probabilities), the threshold being the
quantile of the first ``sample_size`` rows' scores, computed once by ``prepare`` and stored in
manifest.json, so a resumed job uses the same one. The score lands in ``aesthetic_score`` /
``nsfw_score`` (status table and KEY.json).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np
import pyarrow as pa

from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.schema import Batch
from pipeline.core.stage import JobContext

from .base import Filter, score_problem
from .clip_model import absolute_if_path, embedding_width, file_digest
from .clip_score import IMAGE_EMBEDDING, clip_id
from .frames import CLIP_EMBEDDINGS, judge_clips, per_clip_scores

HUB = "hf-hub:"


@dataclass
class HeadConfig:
    checkpoint: str = ""                # a state dict file, or hf-hub:OWNER/REPO/FILE from the local HF cache
    model: str = "ViT-L-14"             # the CLIP whose image embeddings the head reads
    pretrained: Optional[str] = "openai"
    min: Optional[float] = None
    max: Optional[float] = None
    top_fraction: Optional[float] = None
    sample_size: int = 2000             # rows scored up front (in the driver) for the top_fraction cut
    cache_dir: Optional[str] = None     # the Hugging Face cache for hf-hub: ids (None: the standard one)

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint: required: a state dict file or hf-hub:OWNER/REPO/FILE")
        if self.checkpoint.startswith(HUB) and self.checkpoint[len(HUB):].count("/") < 2:
            raise ConfigError(f"checkpoint: {self.checkpoint!r}: a hub checkpoint is hf-hub:OWNER/REPO/FILE")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ConfigError(f"min: {self.min} is above max {self.max}")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ConfigError(f"top_fraction: must be in (0, 1], got {self.top_fraction}")
        if self.sample_size <= 0:
            raise ConfigError(f"sample_size: must be > 0, got {self.sample_size}")


def resolve_checkpoint(checkpoint: str, cache_dir: Optional[str]) -> str:
    """The local file of ``checkpoint``; ConfigError (naming it) when there is none."""
    if not checkpoint.startswith(HUB):
        if not os.path.isfile(checkpoint):
            raise ConfigError(f"checkpoint: {checkpoint!r} is not a file")
        return checkpoint
    from huggingface_hub import hf_hub_download

    owner, repo, filename = checkpoint[len(HUB):].split("/", 2)
    try:
        return hf_hub_download(f"{owner}/{repo}", filename, cache_dir=cache_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - not in the cache (hub errors have many types)
        raise ConfigError(f"checkpoint: {checkpoint!r} is not in the local Hugging Face cache "
                          f"({cache_dir or 'the default one'}): fetch it first (huggingface-cli download "
                          f"{owner}/{repo} {filename}) ({type(e).__name__})") from None


def read_state_dict(path: str) -> dict[str, Any]:
    """The tensors of a checkpoint file (never unpickling code: weights only)."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{type(state).__name__}, not a state dict")
    return state


class HeadFilter(Filter):
    """A score from an MLP over the CLIP image embedding, with min / max / top_fraction."""

    Config = HeadConfig
    stateful = True                      # the head is loaded once per worker
    worker_state = ("_head",)
    column: ClassVar[str]
    scores_column: ClassVar[str]         # a scene row's score per clip (frames.per_clip_scores)
    higher_is_better: ClassVar[bool]     # what top_fraction keeps
    keys: ClassVar[frozenset[str]]       # the state dict's keys in this head's layout

    def __init__(self, config: HeadConfig) -> None:
        # paths made absolute here, in the driver: workers may run in another directory
        super().__init__(dataclasses.replace(config, checkpoint=absolute_if_path(config.checkpoint),
                                             cache_dir=absolute_if_path(config.cache_dir)))
        self.threshold: Optional[float] = None
        self._head: Any = None
        self._fingerprint: Optional[dict[str, Any]] = None

    @property
    def columns(self) -> dict[str, str]:
        return {self.column: "double", self.scores_column: pa.list_(pa.float64())}

    def clip_embedding(self) -> tuple[str, Optional[str]]:
        return clip_id(self.config.model, self.config.pretrained)

    @property
    def path(self) -> str:
        try:
            return resolve_checkpoint(self.config.checkpoint, self.config.cache_dir)
        except ConfigError as e:
            raise ConfigError(f"{self.name}.{e}") from None

    def check(self) -> None:
        c = self.config
        width = self.input_width(self.load_state(self.path))
        clip_width = embedding_width(c.model)
        if clip_width is not None and clip_width != width:
            raise ConfigError(f"{self.name}.checkpoint: {os.path.basename(self.path)} takes {width}-wide embeddings, "
                              f"but {c.model} ({c.pretrained}) gives {clip_width}-wide ones: set model/pretrained "
                              "to the CLIP the head was trained on")

    def load_state(self, path: str) -> dict[str, Any]:
        """The state dict, checked against this head's layout (ConfigError naming the file)."""
        try:
            state = read_state_dict(path)
        except Exception as e:  # noqa: BLE001 - a file torch or safetensors cannot read
            raise ConfigError(f"{self.name}.checkpoint: {path} cannot be read as a state dict "
                              f"({type(e).__name__}: {e})") from None
        if set(state) != self.keys:
            missing, extra = sorted(self.keys - set(state)), sorted(set(state) - self.keys)
            raise ConfigError(f"{self.name}.checkpoint: {path} is not in the {self.name} head's layout "
                              f"(missing {missing}, unexpected {extra}; see filters/clip_heads.py)")
        return state

    # -- the model -------------------------------------------------------------------------------
    def input_width(self, state: dict[str, Any]) -> int:
        raise NotImplementedError

    def build(self, state: dict[str, Any]):
        """The torch module of this layout, widths from ``state``, before loading it."""
        raise NotImplementedError

    def output(self, raw):
        """The score from the module's output (a tensor of shape [n, 1])."""
        return raw[:, 0]

    def _load(self):
        state = self.load_state(self.path)
        module = self.build(state)
        module.load_state_dict(state)
        # float64: tiny heads cost nothing more, and the score no longer depends on how many
        # threads split the sums (a Ray actor and the driver give the same bytes)
        return module.double().eval()

    def setup(self) -> None:
        if self._head is None:
            self._head = self._load()

    def scores(self, embeddings: list[np.ndarray], head=None) -> list[float]:
        import torch

        with torch.inference_mode():
            raw = (self._head if head is None else head)(torch.from_numpy(np.stack(embeddings).astype(np.float64)))
            return [float(v) for v in self.output(raw).numpy()]

    def _scored(self, batch: Batch, head=None) -> list[tuple[int, list[float], bool]]:
        """Alive rows with an embedding: (row, its scores, cut into scenes): a scene row's one per
        clip, any other row's one; every embedding through the head in one call."""
        if IMAGE_EMBEDDING not in batch:
            raise RuntimeError(f"{self.name}: the batch has no {IMAGE_EMBEDDING!r} column: build_filters puts a "
                               "clip_score stage before this filter")
        column = batch[IMAGE_EMBEDDING]
        per_clip = batch.get(CLIP_EMBEDDINGS) or [None] * schema.batch_len(batch)
        rows = [(i, per_clip[i] is not None) for i in schema.alive(batch) if column[i] is not None]
        groups = [per_clip[i] if scenes else [column[i]] for i, scenes in rows]
        flat = self.scores([v for group in groups for v in group], head) if rows else []
        out, start = [], 0
        for (i, scenes), group in zip(rows, groups):
            out.append((i, flat[start:start + len(group)], scenes))
            start += len(group)
        return out

    def process(self, batch: Batch) -> Batch:
        if self.config.top_fraction is not None and self.threshold is None:
            raise RuntimeError(f"{self.name}: top_fraction needs its threshold: the job runs prepare() or "
                               "restore() before any shard")
        self.setup()
        scored = self._scored(batch)
        single = [(i, scores[0]) for i, scores, scenes in scored if not scenes]
        self.record_scores(batch, self.column, [i for i, _ in single], [s for _, s in single], self.problem_with)
        for i, scores, scenes in scored:
            if scenes:  # clip by clip, as clip_score judges them (module docstring)
                _, why = judge_clips(batch, i, self.scores_column, scores, self.problem_with)
                if why:
                    self.reject(batch, i, why)
        return batch

    def problem_with(self, score: float) -> Optional[str]:
        c = self.config
        return score_problem(self.column.replace("_", " "), score, c.min, c.max, self.threshold, c.top_fraction,
                             self.higher_is_better)

    # -- the top_fraction threshold, once per job ------------------------------------------------
    def prepare(self, context: JobContext) -> Optional[dict[str, Any]]:
        fraction = self.config.top_fraction
        if fraction is None:
            return None
        head, scores = self._load(), []
        for batch in context.sample_batches(self.config.sample_size):  # a scene row's clips count one by one
            scores.extend(s for _, row, _ in self._scored(batch, head) for s in row)
        if not scores:
            raise RuntimeError(f"{self.name}: none of the first {self.config.sample_size} rows reached the filter "
                               "with an image embedding, so the top_fraction threshold cannot be estimated")
        q = 1.0 - fraction if self.higher_is_better else fraction
        threshold = float(np.quantile(np.asarray(scores, dtype=np.float64), q))
        return {"threshold": threshold, "top_fraction": fraction, "sample_size": len(scores),
                "keep": "above" if self.higher_is_better else "below"}

    def restore(self, state: dict[str, Any]) -> None:
        self.threshold = state.get("threshold")

    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            fp = super().fingerprint()
            fp["checkpoint_sha256"] = file_digest(self.path)
            self._fingerprint = fp
        return self._fingerprint


def _linear_keys(*names: str) -> frozenset[str]:
    return frozenset(f"{n}.{p}" for n in names for p in ("weight", "bias"))


class AestheticFilter(HeadFilter):
    name = "aesthetic"
    column = "aesthetic_score"
    scores_column = per_clip_scores("aesthetic_scores", column, higher_is_better=True)
    higher_is_better = True
    LINEARS = (0, 2, 4, 6, 7)  # the nn.Sequential's Linear positions; Dropouts between the first four
    keys = _linear_keys(*(f"layers.{i}" for i in LINEARS))

    def input_width(self, state: dict[str, Any]) -> int:
        return int(state["layers.0.weight"].shape[1])

    def build(self, state: dict[str, Any]):
        from torch import nn

        layers: list[nn.Module] = []
        for i in range(self.LINEARS[-1] + 1):
            if i in self.LINEARS:
                out, inp = state[f"layers.{i}.weight"].shape
                layers.append(nn.Linear(inp, out))
            else:
                layers.append(nn.Dropout())  # identity in eval mode; keeps the published indices

        class Aesthetic(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.layers = nn.Sequential(*layers)

            def forward(self, x):
                return self.layers(x)

        return Aesthetic()


@dataclass
class NsfwConfig(HeadConfig):
    def validate(self) -> None:
        super().validate()
        for name in ("min", "max"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ConfigError(f"{name}: the NSFW score is a probability, in 0..1; got {value}")


class NsfwFilter(HeadFilter):
    name = "nsfw"
    Config = NsfwConfig
    column = "nsfw_score"
    scores_column = per_clip_scores("nsfw_scores", column, higher_is_better=False)
    higher_is_better = False
    keys = frozenset({"norm.mean", "norm.variance"}) | _linear_keys("linear_1", "linear_2", "linear_3", "linear_4")

    def input_width(self, state: dict[str, Any]) -> int:
        return int(state["linear_1.weight"].shape[1])

    def build(self, state: dict[str, Any]):
        import torch
        from torch import nn

        shapes = [tuple(state[f"linear_{k}.weight"].shape) for k in range(1, 5)]

        class Norm(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.register_buffer("mean", torch.zeros(state["norm.mean"].shape))
                self.register_buffer("variance", torch.ones(state["norm.variance"].shape))

            def forward(self, x):
                return (x - self.mean) / self.variance.sqrt()

        class Nsfw(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.norm = Norm()
                for k, (out, inp) in enumerate(shapes, 1):
                    setattr(self, f"linear_{k}", nn.Linear(inp, out))

            def forward(self, x):
                x = self.norm(x)
                for k in (1, 2, 3):
                    x = torch.relu(getattr(self, f"linear_{k}")(x))
                return torch.sigmoid(self.linear_4(x))

        return Nsfw()
