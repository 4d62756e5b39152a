"""``clip_score``: cosine similarity of each image with its caption under an open_clip model, in
the stream between download and write, so only kept samples are ever written.

Rules: ``min`` (absolute threshold) and ``top_fraction`` (keep the best fraction of the job: the
threshold is the quantile of the scores of the first ``sample_size`` rows, computed once by
``prepare`` and stored in manifest.json, so a resumed job uses the same one). Presets:
``laion`` (OpenAI ViT-B-32, min 0.28) and ``datacomp`` (OpenAI ViT-L-14, top 30%); keys given
next to a preset override it. Every scored row gets ``clip_score``; with ``store_embeddings``
the image embedding is written as ``KEY.clip.npy`` (float16, L2-normalised).

**Video rows** (``download.media: video``): each clip is seen through ``frames`` frames spread
evenly over it (:mod:`filters.frames`), embedded by the same image pass; its score is the
``aggregate`` (mean, min or max) of its frames' scores against the caption, its embedding the
normalised mean of theirs. A row cut into scenes (members ``clip_NNN.mp4``) is judged clip by
clip, as ``video.min_motion`` judges them: the clips below ``min`` / the ``top_fraction`` cut are
dropped (the rest renumbered, the row's columns summed again: :func:`filters.frames.keep_clips`) and
the row is filtered only when none is left; ``clip_scores`` holds each clip's score, ``clip_score``
the lowest kept one (so every clip written reaches it) or, for a filtered row, the best one.
``top_fraction`` counts clips.

This is the job's one CLIP image pass. When later filters read image embeddings (aesthetic,
nsfw, semantic dedup: ``Filter.clip_embedding()``), ``filters.build_filters`` sets
``share_embeddings`` on the clip_score stage of their CLIP (adding one with ``captions: false``,
image tower only, no score, when the job has none), and the stage puts each kept row's
L2-normalised float32 embedding in the transient column ``IMAGE_EMBEDDING`` (None elsewhere); for
a row cut into scenes that is the normalised mean of its kept clips' embeddings, and the clips' own
are in ``CLIP_EMBEDDINGS`` (a list in member order, None for other rows), so the heads score each
clip; a later filter that drops clips keeps both in step (``keep_clips``).

The device (``ModelStage.place``), the precision and the decoder are resolved once, in the
driver, and pickled with the stage: every worker scores the same way, whatever GPUs its process
sees, the fingerprint records what they resolved to, and the ``top_fraction`` sample pass scores
with the same precision and decoder (on this machine's GPU if it has one, else on its CPU; the
model it loads for that pass is freed before the shards run).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np
import pyarrow as pa

from pipeline.core import schema
from pipeline.core.config import ConfigError, from_dict
from pipeline.core.model_stage import ModelStage, cuda_available, free_cuda_memory, poisons_device
from pipeline.core.schema import Batch
from pipeline.core.stage import JobContext
from pipeline.media.npy import npy_bytes

from .base import Filter, with_preset
from .clip_model import (RANDOM_WEIGHTS, TORCH_RESIZE_MODES, absolute_if_path, file_digest, is_config_path,
                         resolve_decode, resolve_precision)
from .frames import (AGGREGATES, CLIP_EMBEDDINGS, EMBEDDING_FILE, Aggregate, aggregate_score, judge_clips,
                     mean_embedding, per_clip_scores, pictures, row_chunks, row_embedding)

COLUMN = "clip_score"
# a scene row's score per clip, in the order of its clip_NNN members; clip_score its lowest kept one
CLIP_SCORES = per_clip_scores("clip_scores", COLUMN, higher_is_better=True)
CLIP_SCORES_TYPE = pa.list_(pa.float64())
# Transient batch column: per row the L2-normalised float32 image embedding (or None), for the
# filters after this one that need it (one image pass per sample); never written.
IMAGE_EMBEDDING = schema.CLIP_IMAGE_EMBEDDING
SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip ids that carry their own weights (pretrained is ignored)
PRESETS: dict[str, dict[str, Any]] = {
    "laion": {"model": "ViT-B-32", "pretrained": "openai", "min": 0.28},        # LAION-5B (English)
    "datacomp": {"model": "ViT-L-14", "pretrained": "openai", "top_fraction": 0.3},  # DataComp CLIP L/14 30%
}


@dataclass
class ClipScoreConfig:
    model: str = "ViT-B-32"             # open_clip name, hf-hub:/local-dir: id, or a model config JSON
    pretrained: Optional[str] = None    # open_clip tag, checkpoint path, or "random" (benchmarks only)
    min: Optional[float] = None
    top_fraction: Optional[float] = None
    sample_size: int = 2000             # rows scored up front (in the driver) for the top_fraction cut
    batch_size: int = 256
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_gpus: float = 1.0               # per actor, when on a GPU (fractions pack several per GPU)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    decode: Literal["auto", "pil", "torch"] = "auto"     # auto: torch (nvJPEG) on CUDA when the model's
                                                         # preprocessing allows it, else pil
    draft: bool = True                  # pil: JPEG DCT-domain downscale when >= 2x the model input
    decode_threads: int = 2
    store_embeddings: bool = False
    captions: bool = True               # false: image embeddings only (no text tower, no clip_score)
    frames: int = 4                     # video rows: frames sampled per clip, evenly from first to last
    aggregate: Aggregate = "mean"       # video rows: a clip's score from its frames' scores

    def validate(self) -> None:
        if not self.pretrained and not self.model.startswith(SCHEMAS):
            raise ConfigError("pretrained: required: an open_clip tag (e.g. openai), a checkpoint path, "
                              f"or {RANDOM_WEIGHTS!r} for random weights")
        if self.min is not None and not -1 <= self.min <= 1:
            raise ConfigError(f"min: a cosine similarity, in -1..1; got {self.min}")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ConfigError(f"top_fraction: must be in (0, 1], got {self.top_fraction}")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"aggregate: one of {', '.join(AGGREGATES)}; got {self.aggregate!r}")
        for name in ("sample_size", "batch_size", "decode_threads", "frames"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.num_gpus <= 0:
            raise ConfigError(f"num_gpus: must be > 0, got {self.num_gpus}")
        if not self.captions and (self.min is not None or self.top_fraction is not None):
            raise ConfigError(f"captions: false computes no clip score, so min ({self.min}) and top_fraction "
                              f"({self.top_fraction}) cannot apply")

    @property
    def clip(self) -> tuple[str, Optional[str]]:
        return clip_id(self.model, self.pretrained)


def clip_id(model: str, pretrained: Optional[str]) -> tuple[str, Optional[str]]:
    """Which CLIP this is, comparable across filters: (model, pretrained), paths made absolute,
    pretrained None where the model id carries its own weights."""
    return absolute_if_path(model), None if model.startswith(SCHEMAS) else absolute_if_path(pretrained)


class ClipScoreFilter(ModelStage, Filter):
    name = "clip_score"
    Config = ClipScoreConfig

    def __init__(self, config: ClipScoreConfig) -> None:
        # paths made absolute here, in the driver: workers may run in another directory
        super().__init__(dataclasses.replace(config, model=absolute_if_path(config.model),
                                             pretrained=absolute_if_path(config.pretrained)))
        self.threshold: Optional[float] = None  # the top_fraction cut, from prepare() or restore()
        self._fingerprint: Optional[dict] = None
        self._resize_mode: Optional[str] = None  # open_clip's for this model, read once in the driver
        self._settings: Optional[dict[str, str]] = None
        self.share_embeddings = False  # set by build_filters when later filters read IMAGE_EMBEDDING

    @classmethod
    def embedder(cls, model: str, pretrained: Optional[str]) -> "ClipScoreFilter":
        """An image-only stage of this CLIP, for filters that read its embeddings."""
        stage = cls(ClipScoreConfig(model=model, pretrained=pretrained, captions=False))
        stage.share_embeddings = True
        return stage

    @classmethod
    def parse(cls, raw: Any, path: str) -> ClipScoreConfig:
        return from_dict(ClipScoreConfig, with_preset(raw, PRESETS, path), path)

    @property
    def columns(self) -> dict[str, str]:
        return {COLUMN: "double", CLIP_SCORES: CLIP_SCORES_TYPE} if self.config.captions else {}

    def check(self) -> None:
        import open_clip

        from .clip_model import register_model

        c = self.config
        if not c.model.startswith(SCHEMAS):  # those are resolved by open_clip when loading
            name, _ = register_model(c.model)
            if open_clip.get_model_config(name) is None:
                raise ConfigError(f"clip_score.model: {c.model!r} is neither an open_clip model "
                                  f"(see open_clip.list_models()) nor a model config JSON file")
            tags = open_clip.list_pretrained_tags_by_model(name)
            if c.pretrained != RANDOM_WEIGHTS and not os.path.isfile(c.pretrained) and c.pretrained not in tags:
                raise ConfigError(f"clip_score.pretrained: {c.pretrained!r} is not a checkpoint file nor an "
                                  f"open_clip tag of {name} (tags: {', '.join(tags) or 'none'})")
        mode = self.resize_mode
        if c.decode == "torch" and mode is not None and mode not in TORCH_RESIZE_MODES:
            raise ConfigError(f"clip_score.decode: 'torch' implements resize_mode 'shortest' only; {c.model} "
                              f"({c.pretrained}) uses resize_mode {mode!r}: use decode: pil or auto")

    @property
    def resize_mode(self) -> Optional[str]:
        """open_clip's resize mode for this model (None: known only once loaded)."""
        if self._resize_mode is None:
            from .clip_model import preprocess_config

            cfg = preprocess_config(self.config.model, self.config.pretrained)
            self._resize_mode = cfg["resize_mode"] if cfg else None
        return self._resize_mode

    @property
    def settings(self) -> dict[str, str]:
        """The device, precision and decoder every worker uses, resolved once (in the driver)."""
        if self._settings is None:
            c, device = self.config, self.device
            self._settings = {"device": device, "precision": resolve_precision(c.precision, device),
                              "decode": resolve_decode(c.decode, device, self.resize_mode)}
        return self._settings

    def load_model(self):
        return self._scorer(self.device)

    def _scorer(self, device: str):
        from .clip_model import load_clip
        from .clip_scorer import ClipScorer

        c, s = self.config, self.settings
        clip = load_clip(c.model, c.pretrained, device=device)
        return ClipScorer(clip, batch_size=c.batch_size, precision=s["precision"], decode=s["decode"],
                          draft=c.draft, threads=c.decode_threads,
                          tokenize_processes=None if c.captions else 0)

    def _score(self, batch: Batch, scorer, embeddings: bool = False) -> list["RowScores"]:
        """Per-clip scores (and embeddings) of the alive rows with an image or video clips (an
        image is a row's one clip); rows whose image or frames cannot be decoded are marked here. Video
        rows go in chunks of at most ``batch_size`` decoded frames: memory does not grow with the shard."""
        return [row for chunk in row_chunks(batch, self.config.frames, self.config.batch_size)
                for row in self._score_rows(batch, scorer, embeddings, chunk)]

    def _score_rows(self, batch: Batch, scorer, embeddings: bool, chunk: list[int]) -> list["RowScores"]:
        c = self.config
        pics = pictures(batch, c.frames, c.decode_threads, chunk)
        for i, (kind, message) in pics.errors.items():
            schema.mark(batch, i, kind, f"{self.name}: {message}")
        captions = None
        if c.captions:  # each picture with its row's caption
            captions = [batch[schema.CAPTION][i] or "" for i, groups in zip(pics.rows, pics.clips)
                        for group in groups for _ in group]
        result = scorer.score(pics.pictures, captions, embeddings=embeddings)
        rows = []
        for i, video, members, groups in zip(pics.rows, pics.video, pics.members, pics.clips):
            bad = next((p for group in groups for p in group if p in result.errors), None)
            if bad is not None:
                kind, message = result.errors[bad]
                schema.mark(batch, i, kind, f"{self.name}: {message}")
                continue
            # one picture (an image, or frames: 1) keeps its own numbers: no aggregate, no renormalising
            scores = None if captions is None else [
                float(result.scores[g[0]]) if len(g) == 1 else aggregate_score(result.scores, g, c.aggregate)
                for g in groups]
            vectors = None if result.image_embeddings is None else [
                result.image_embeddings[g[0]] if len(g) == 1 else mean_embedding(result.image_embeddings, g)
                for g in groups]
            rows.append(RowScores(i, video and members != ["mp4"], scores, vectors))
        return rows

    def process(self, batch: Batch) -> Batch:
        o = self.config
        if o.top_fraction is not None and self.threshold is None:
            raise RuntimeError("clip_score: top_fraction needs its threshold: the job runs prepare() or "
                               "restore() before any shard")
        try:
            rows = self._score(batch, self.model, embeddings=o.store_embeddings or self.share_embeddings)
        except Exception as e:
            if poisons_device(e):  # every later batch of this worker would fail too: replace it
                raise self.lost_device(e) from e
            raise
        if self.share_embeddings:  # replaces any other CLIP's: the filters after this one read this one's
            batch[IMAGE_EMBEDDING] = [None] * schema.batch_len(batch)
            batch[CLIP_EMBEDDINGS] = [None] * schema.batch_len(batch)
        for row in rows:
            if not o.captions:
                self._keep(batch, row, list(range(len(row.embeddings))))
            elif row.scenes:
                self._judge_clips(batch, row)
            else:
                score = row.scores[0]
                schema.set_column(batch, COLUMN, [row.i], [score])
                why = self._below(score)
                if why:
                    self.reject(batch, row.i, why)
                else:
                    self._keep(batch, row, [0])
        return batch

    def _below(self, score: float) -> Optional[str]:
        """Why a score is too low, or None."""
        o = self.config
        if o.min is not None and score < o.min:
            return f"clip score {score:.4f} below min {o.min:g}"
        if self.threshold is not None and score < self.threshold:
            return f"clip score {score:.4f} below the top {o.top_fraction:.0%} threshold {self.threshold:.4f}"
        return None

    def _judge_clips(self, batch: Batch, row: "RowScores") -> None:
        """A scene row: its clips below the rules are dropped, the row only when none is left. Its
        clip_score is then its lowest kept clip's (every clip written reaches it), or, filtered,
        its best clip's; clip_scores keeps each clip's, in member order."""
        kept, why = judge_clips(batch, row.i, CLIP_SCORES, row.scores, self._below)
        if why:
            self.reject(batch, row.i, why)
        else:
            self._keep(batch, row, kept)

    def _keep(self, batch: Batch, row: "RowScores", clips: list[int]) -> None:
        """A kept row's embedding over its kept ``clips``: in the tar (store_embeddings), for the
        filters after (shared; a scene row's clips' own too)."""
        embedding = row.embedding(clips)
        if self.config.store_embeddings:
            batch[schema.FILES][row.i][EMBEDDING_FILE] = npy_bytes(embedding.astype(np.float16))
        if self.share_embeddings:
            batch[IMAGE_EMBEDDING][row.i] = embedding
            if row.scenes:
                batch[CLIP_EMBEDDINGS][row.i] = [row.embeddings[k] for k in clips]

    # -- the top_fraction threshold, once per job ------------------------------------------------
    def prepare(self, context: JobContext) -> dict[str, Any] | None:
        fraction = self.config.top_fraction
        if fraction is None:
            return None
        # The workers' precision and decoder; their device when this machine has it (a CPU-only
        # driver of a GPU cluster scores on its CPU). A model of its own, freed after the pass.
        here = self.device if self.device == "cpu" or cuda_available() else "cpu"
        scorer = self._scorer(here)
        scores: list[float] = []
        try:
            for batch in context.sample_batches(self.config.sample_size):
                for row in self._score(batch, scorer):  # a video's clips count one by one
                    scores.extend(row.scores)
        finally:
            scorer.close()
            del scorer
            free_cuda_memory()
        if not scores:
            raise RuntimeError(f"clip_score: none of the first {self.config.sample_size} rows reached the filter "
                               "with a decodable image, so the top_fraction threshold cannot be estimated")
        threshold = float(np.quantile(np.asarray(scores, dtype=np.float64), 1.0 - fraction))
        return {"threshold": threshold, "top_fraction": fraction, "sample_size": len(scores),
                "device": here, "precision": self.settings["precision"], "decode": self.settings["decode"]}

    def restore(self, state: dict[str, Any]) -> None:
        self.threshold = state.get("threshold")

    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            o = self.config
            fp: dict[str, Any] = {"filter": self.name, "model": o.model, "pretrained": o.pretrained,
                                  **self.settings, "draft": o.draft}
            if not o.captions:
                fp["captions"] = False
            if (o.frames, o.aggregate) != (4, "mean"):  # what video rows are scored from (images: unused)
                fp["frames"], fp["aggregate"] = o.frames, o.aggregate
            if is_config_path(o.model):
                fp["model"], fp["model_config_sha256"] = os.path.basename(o.model), file_digest(o.model)
            if o.pretrained and os.path.isfile(o.pretrained):
                fp["pretrained"], fp["pretrained_sha256"] = os.path.basename(o.pretrained), file_digest(o.pretrained)
            self._fingerprint = fp
        return self._fingerprint


@dataclass
class RowScores:
    """One scored row: per clip (an image row: its one image) the score and the embedding."""

    i: int
    scenes: bool                          # clips KEY.clip_NNN.mp4 of a row cut into scenes
    scores: Optional[list[float]]         # None without captions
    embeddings: Optional[list[np.ndarray]]  # L2-normalised; None when not asked for

    def embedding(self, clips) -> Optional[np.ndarray]:
        """The row's embedding over ``clips``: one clip's own, else their mean, normalised again."""
        if self.embeddings is None:
            return None
        return row_embedding([self.embeddings[k] for k in clips])
