"""``watermark``: the probability that an image carries a watermark, from an image classifier
loaded through timm or transformers, in the stream between download and write.

The reference is LAION's watermark detector (LAION-5B-WatermarkDetection, ``watermark_model_v1.pt``):
timm ``efficientnet_b3a`` whose ``classifier`` is replaced by an MLP (1536 -> 625 -> ReLU ->
Dropout -> 256 -> ReLU -> 2), saved as a plain ``state_dict``; images squashed to 256 x 256
(``Resize((256, 256))``, no crop), ImageNet mean and std; softmax over the two logits, class 0 is
"watermark" and class 1 "clear" (LAION's example unpacks ``water, clear = softmax(...)``). The
``laion`` preset sets those (``{preset: laion, checkpoint: .../watermark_model_v1.pt}``).

``model`` is one of:

* a timm architecture name, with ``checkpoint`` a state dict (``.pt``/``.pth``/``.bin`` read
  with ``weights_only``, or ``.safetensors``): LAION's layout. When the state dict's head is an MLP
  (``classifier.0.weight``, ``classifier.3.weight``, ... instead of ``classifier.weight``) the head
  is rebuilt from those shapes, Linear layers with ReLU between (dropout is inert at inference);
* a timm hub-style folder (``config.json`` with ``architecture``, ``num_classes``,
  ``pretrained_cfg`` + ``model.safetensors`` or ``pytorch_model.bin``);
* a transformers image-classification folder (``config.json`` with ``architectures``, loaded by
  ``AutoModelForImageClassification``; resize and normalisation from its
  ``preprocessor_config.json``);
* a hub id (``owner/name`` or ``hf-hub:owner/name``) of either folder layout, resolved from the
  local Hugging Face cache only (no download at run time).

Which output class means "watermark" is ``watermark_class`` (0 for LAION). The score is that
class's softmax probability, in the ``watermark_score`` column (status table and KEY.json).
Rules: ``max`` (reject above), ``min`` (reject below: to keep only watermarked images),
``top_fraction`` (keep the cleanest fraction of the job: the threshold is the ``top_fraction``
quantile of the scores of the first ``sample_size`` rows, computed once by ``prepare`` and kept in
manifest.json, rows scoring above it are rejected). Images are squashed to ``image_size`` (default:
the model's own input size; 256 for the preset) with bilinear resampling, as LAION's transform does.

Images are opened with :func:`pipeline.media.image_open.open_image` (whitelist, pixel cap); one
that does not decode fails with its ``ImageRejected`` kind. Images decode on ``decode_threads``
threads; the forward pass runs ``batch_size`` images at a time on the stage's device.
"""
from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np

from pipeline.core import schema
from pipeline.core.config import ConfigError, from_dict
from pipeline.core.model_stage import ModelStage, cuda_available, free_cuda_memory, poisons_device
from pipeline.core.schema import Batch
from pipeline.core.stage import JobContext
from pipeline.media.image_open import open_image

from .base import Filter, alive_with_image, score_problem, with_preset
from .clip_model import absolute_if_path, file_digest

COLUMN = "watermark_score"
HUB_PREFIX = "hf-hub:"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRESETS: dict[str, dict[str, Any]] = {
    # LAION-5B-WatermarkDetection (example_use.py): 256 px squash, class 0 = watermark; its example
    # calls an image watermarked above 0.5 (add max: 0.5 for that rule)
    "laion": {"model": "efficientnet_b3", "image_size": 256, "watermark_class": 0},
}
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass
class WatermarkConfig:
    model: str = "efficientnet_b3"        # timm name (+ checkpoint), a timm/transformers folder, or a hub id
    checkpoint: Optional[str] = None      # state dict for a timm name (LAION's watermark_model_v1.pt)
    watermark_class: int = 0              # the output index meaning "watermark" (LAION: 0)
    image_size: Optional[int] = None      # squash to this square; None: the model's own input size
    max: Optional[float] = None
    min: Optional[float] = None
    top_fraction: Optional[float] = None  # keep the cleanest fraction (lowest scores) of the job
    sample_size: int = 2000               # rows scored up front (in the driver) for top_fraction
    batch_size: int = 64
    decode_threads: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_gpus: float = 1.0                 # per actor, when on a GPU (fractions pack several per GPU)

    def validate(self) -> None:
        for name in ("max", "min"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ConfigError(f"{name}: a probability, in 0..1; got {value}")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ConfigError(f"top_fraction: must be in (0, 1], got {self.top_fraction}")
        if self.watermark_class < 0:
            raise ConfigError(f"watermark_class: an output index, >= 0; got {self.watermark_class}")
        for name in ("sample_size", "batch_size", "decode_threads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.image_size is not None and self.image_size <= 0:
            raise ConfigError(f"image_size: must be > 0, got {self.image_size}")
        if self.num_gpus <= 0:
            raise ConfigError(f"num_gpus: must be > 0, got {self.num_gpus}")
        if self.checkpoint is not None and not self.checkpoint.endswith(STATE_DICT_SUFFIXES):
            raise ConfigError(f"checkpoint: a state dict file ({', '.join(STATE_DICT_SUFFIXES)}), "
                              f"got {self.checkpoint!r}")


# -- finding and loading the classifier ---------------------------------------------------------
@dataclass
class Classifier:
    module: Any                         # torch module in eval mode, on ``device``: pixels -> logits
    size: tuple[int, int]               # (height, width) the images are squashed to
    mean: tuple[float, ...]
    std: tuple[float, ...]
    transformers: bool                  # the module returns an output object with ``.logits``
    num_classes: int = 0                # read once loaded


def resolve_folder(model: str) -> Optional[Path]:
    """The local folder ``model`` names: a directory, or a hub id's snapshot in the local HF cache
    (None for a timm architecture name). A hub id missing from the cache raises ConfigError."""
    if os.path.isdir(model):
        return Path(model)
    repo = model[len(HUB_PREFIX):] if model.startswith(HUB_PREFIX) else model
    if "/" not in repo:
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception as e:  # not cached: say so rather than try the network
        raise ConfigError(f"model: {model!r} is not a folder and not in the local Hugging Face cache "
                          f"({type(e).__name__}: {e})") from None


def folder_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"model: {folder} has no config.json (a timm or transformers classifier folder)")
    return json.loads(path.read_text())


def declared_classes(cfg: dict[str, Any]) -> Optional[int]:
    """The output classes a folder's config.json declares (timm: num_classes; transformers: its labels)."""
    if "architecture" in cfg:
        return cfg.get("num_classes")
    labels = cfg.get("id2label")
    return len(labels) if labels else cfg.get("num_labels")


def weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"model: {folder} has neither model.safetensors nor pytorch_model.bin")


def read_state_dict(path: str | Path) -> dict[str, Any]:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a training checkpoint
        state = state["state_dict"]
    return state


def _head_name(model) -> str:
    return model.pretrained_cfg.get("classifier") or "classifier"


def _mlp_head(state: dict[str, Any], head: str):
    """An MLP head rebuilt from ``head.N.weight`` shapes (LAION's layout), or None for a plain head."""
    import torch.nn as nn

    if f"{head}.weight" in state:
        return None
    prefix = f"{head}."
    linear = sorted({int(k[len(prefix):].split(".")[0]) for k in state
                     if k.startswith(prefix) and k.endswith(".weight") and k[len(prefix):].split(".")[0].isdigit()})
    if not linear:
        return None
    layers: list[nn.Module] = [nn.Identity() for _ in range(linear[-1] + 1)]
    for n in linear:
        out_features, in_features = state[f"{prefix}{n}.weight"].shape
        layers[n] = nn.Linear(in_features, out_features)
        if n != linear[-1]:
            layers[n + 1] = nn.ReLU()
    return nn.Sequential(*layers)


def _set_head(model, head: str, module) -> None:
    *parents, leaf = head.split(".")
    owner = model
    for name in parents:
        owner = getattr(owner, name)
    setattr(owner, leaf, module)


def _timm_with_state(architecture: str, state: dict[str, Any], **kwargs):
    import timm

    model = timm.create_model(architecture, pretrained=False, **kwargs)
    head = _head_name(model)
    mlp = _mlp_head(state, head)
    if mlp is not None:
        _set_head(model, head, mlp)
    elif f"{head}.weight" in state and "num_classes" not in kwargs:  # the head's width from the weights
        model.reset_classifier(state[f"{head}.weight"].shape[0])
    model.load_state_dict(state)  # strict: a checkpoint of another architecture fails loudly
    return model


def _timm_preprocessing(model, image_size: Optional[int]) -> tuple[tuple[int, int], tuple, tuple]:
    cfg = model.pretrained_cfg
    _, h, w = cfg.get("input_size", (3, 224, 224))
    size = (image_size, image_size) if image_size else (h, w)
    return size, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def _num_classes(module, size: tuple[int, int]) -> int:
    """The width of the output, read by running one blank image (a rebuilt head has no attribute)."""
    import torch

    with torch.inference_mode():
        return int(module(torch.zeros(1, 3, *size, device=next(module.parameters()).device)).shape[-1])


def load_classifier(config: WatermarkConfig, device: str) -> Classifier:
    """The classifier ``config`` names, in eval mode on ``device``, with its preprocessing."""
    folder = None if config.checkpoint else resolve_folder(config.model)
    if folder is None:
        if not config.checkpoint:
            raise ConfigError(f"checkpoint: required with the timm architecture name {config.model!r} "
                              "(or give model a folder or a hub id)")
        model = _timm_with_state(config.model, read_state_dict(config.checkpoint))
        classifier = Classifier(model, *_timm_preprocessing(model, config.image_size), False)
    elif "architecture" in (cfg := folder_config(folder)):  # timm's push_to_hub layout
        kwargs = {**cfg.get("model_args", {}), "num_classes": cfg.get("num_classes", 1000),
                  "pretrained_cfg_overlay": cfg.get("pretrained_cfg", {})}  # the folder's input size, mean, std
        model = _timm_with_state(cfg["architecture"], read_state_dict(weights_file(folder)), **kwargs)
        classifier = Classifier(model, *_timm_preprocessing(model, config.image_size), False)
    else:
        classifier = _transformers_classifier(folder, config.image_size)
    classifier.module.eval().to(device)
    classifier.num_classes = _num_classes_of(classifier)
    if config.watermark_class >= classifier.num_classes:
        raise ConfigError(f"watermark_class: {config.watermark_class}, but {config.model} has "
                          f"{classifier.num_classes} output classes")
    return classifier


def _num_classes_of(classifier: Classifier) -> int:
    if classifier.transformers:
        return int(classifier.module.config.num_labels)
    return _num_classes(classifier.module, classifier.size)


def _transformers_classifier(folder: Path, image_size: Optional[int]) -> Classifier:
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(str(folder))
    path = folder / "preprocessor_config.json"
    pre = json.loads(path.read_text()) if path.is_file() else {}
    size = pre.get("size", getattr(model.config, "image_size", 224))
    if isinstance(size, dict):  # {"height", "width"} or {"shortest_edge"}
        size = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    elif isinstance(size, int):
        size = (size, size)
    if image_size:
        size = (image_size, image_size)
    mean = tuple(pre.get("image_mean", IMAGENET_MEAN)) if pre.get("do_normalize", True) else (0.0, 0.0, 0.0)
    std = tuple(pre.get("image_std", IMAGENET_STD)) if pre.get("do_normalize", True) else (1.0, 1.0, 1.0)
    return Classifier(model, tuple(size), mean, std, True)


# -- scoring --------------------------------------------------------------------------------------
def pixels(data: bytes, size: tuple[int, int]) -> np.ndarray | tuple[str, str]:
    """(3, H, W) uint8: the image squashed to ``size`` (LAION's Resize((256, 256))), or why the
    bytes could not be decoded (its ErrorKind and message)."""
    from PIL import Image

    from .clip_scorer import problem  # here: the scorer module imports PyTorch, which a job's spec check must not

    try:
        with open_image(data) as im:
            rgb = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
    except Exception as e:  # noqa: BLE001 - this image's problem only
        return problem(e)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def watermark_scores(classifier: Classifier, images: list[bytes], watermark_class: int, batch_size: int,
                     threads: int) -> tuple[dict[int, float], dict[int, tuple[str, str]]]:
    """Per position: the watermark probability, or why the image could not be decoded. Images
    decode on ``threads`` threads (PIL releases the GIL), ``batch_size`` at a time per forward pass."""
    import torch

    scores: dict[int, float] = {}
    errors: dict[int, tuple[str, str]] = {}
    device = next(classifier.module.parameters()).device
    mean = torch.tensor(classifier.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(classifier.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            ok, arrays = [], []
            for pos, result in enumerate(pool.map(lambda d: pixels(d, classifier.size), chunk), start):
                if isinstance(result, np.ndarray):
                    ok.append(pos)
                    arrays.append(result)
                else:
                    errors[pos] = result
            if not ok:
                continue
            batch = (torch.from_numpy(np.stack(arrays)).to(device).float() / 255.0 - mean) / std
            with torch.inference_mode():
                out = classifier.module(pixel_values=batch) if classifier.transformers else classifier.module(batch)
                logits = out.logits if classifier.transformers else out
                probs = torch.softmax(logits.float(), dim=-1)[:, watermark_class].cpu().numpy()
            scores.update(zip(ok, (float(p) for p in probs)))
    return scores, errors


class WatermarkFilter(ModelStage, Filter):
    name = "watermark"
    Config = WatermarkConfig

    def __init__(self, config: WatermarkConfig) -> None:
        # paths made absolute here, in the driver: workers may run in another directory
        super().__init__(dataclasses.replace(config, model=absolute_if_path(config.model),
                                             checkpoint=absolute_if_path(config.checkpoint)))
        self.threshold: Optional[float] = None  # the top_fraction cut, from prepare() or restore()
        self._fingerprint: Optional[dict] = None

    @classmethod
    def parse(cls, raw: Any, path: str) -> WatermarkConfig:
        return from_dict(WatermarkConfig, with_preset(raw, PRESETS, path), path)

    @property
    def columns(self) -> dict[str, str]:
        return {COLUMN: "double"}

    def check(self) -> None:
        c = self.config
        if c.checkpoint:
            import timm

            if not timm.is_model(c.model):
                raise ConfigError(f"watermark.model: {c.model!r} is not a timm architecture (see timm.list_models())")
            if not os.path.isfile(c.checkpoint):
                raise ConfigError(f"watermark.checkpoint: no such file: {c.checkpoint}")
            return
        try:
            folder = resolve_folder(c.model)
        except ConfigError as e:
            raise ConfigError(f"watermark.{e}") from None
        if folder is None:
            raise ConfigError(f"watermark.checkpoint: required with the timm architecture name {c.model!r} "
                              "(or give model a folder or a hub id)")
        try:
            cfg = folder_config(folder)
            if "architecture" in cfg:
                weights_file(folder)
        except ConfigError as e:
            raise ConfigError(f"watermark.{e}") from None
        classes = declared_classes(cfg)  # a state dict's head is read when the model loads
        if classes is not None and c.watermark_class >= classes:
            raise ConfigError(f"watermark.watermark_class: {c.watermark_class}, but {c.model} declares "
                              f"{classes} output classes")

    def load_model(self) -> Classifier:
        return load_classifier(self.config, self.device)

    def _score(self, batch: Batch, classifier: Classifier) -> tuple[list[int], list[float]]:
        """Rows scored and their scores; undecodable images are marked failed here."""
        idx, images = alive_with_image(batch)
        c = self.config
        scores, errors = watermark_scores(classifier, images, c.watermark_class, c.batch_size, c.decode_threads)
        for pos, (kind, message) in errors.items():
            schema.mark(batch, idx[pos], kind, f"{self.name}: {message}")
        return [idx[p] for p in sorted(scores)], [scores[p] for p in sorted(scores)]

    def process(self, batch: Batch) -> Batch:
        c = self.config
        if c.top_fraction is not None and self.threshold is None:
            raise RuntimeError("watermark: top_fraction needs its threshold: the job runs prepare() or "
                               "restore() before any shard")
        try:
            rows, scores = self._score(batch, self.model)
        except Exception as e:
            if poisons_device(e):  # every later batch of this worker would fail too: replace it
                raise self.lost_device(e) from e
            raise
        self.record_scores(batch, COLUMN, rows, scores, self.problem_with)
        return batch

    def problem_with(self, score: float) -> Optional[str]:
        c = self.config  # top_fraction keeps the cleanest: the lowest watermark scores
        return score_problem("watermark score", score, c.min, c.max, self.threshold, c.top_fraction,
                             higher_is_better=False)

    # -- the top_fraction threshold, once per job ------------------------------------------------
    def prepare(self, context: JobContext) -> dict[str, Any] | None:
        fraction = self.config.top_fraction
        if fraction is None:
            return None
        # a model of its own on this machine (its GPU if it has one), freed after the pass
        here = self.device if self.device == "cpu" or cuda_available() else "cpu"
        classifier = load_classifier(self.config, here)
        scores: list[float] = []
        try:
            for batch in context.sample_batches(self.config.sample_size):
                scores.extend(self._score(batch, classifier)[1])
        finally:
            del classifier
            free_cuda_memory()
        if not scores:
            raise RuntimeError(f"watermark: none of the first {self.config.sample_size} rows reached the filter "
                               "with a decodable image, so the top_fraction threshold cannot be estimated")
        threshold = float(np.quantile(np.asarray(scores, dtype=np.float64), fraction))
        return {"threshold": threshold, "top_fraction": fraction, "sample_size": len(scores), "device": here}

    def restore(self, state: dict[str, Any]) -> None:
        self.threshold = state.get("threshold")

    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            c = self.config
            fp: dict[str, Any] = {"filter": self.name, "model": c.model, "watermark_class": c.watermark_class,
                                  "image_size": c.image_size, "device": self.device}
            if c.checkpoint:
                fp["checkpoint"], fp["checkpoint_sha256"] = os.path.basename(c.checkpoint), file_digest(c.checkpoint)
            else:
                folder = resolve_folder(c.model)
                if folder is not None:
                    cfg = folder_config(folder)
                    weights = weights_file(folder) if "architecture" in cfg else _transformers_weights(folder)
                    if weights is not None:
                        fp["weights_sha256"] = file_digest(str(weights))
                    if not os.path.isdir(c.model):  # a hub id: its snapshot (commit) too
                        fp["revision"] = folder.name
            self._fingerprint = fp
        return self._fingerprint


def _transformers_weights(folder: Path) -> Optional[Path]:
    try:
        return weights_file(folder)
    except ConfigError:  # sharded weights: the fingerprint names the model only
        return None
