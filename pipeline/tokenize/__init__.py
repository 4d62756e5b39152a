"""Pre-tokenization stages: text ids, discrete visual ids (VQ) and VAE latents, computed once at
curation time so that no training epoch runs the encoder again.

The job's ``tokenize:`` section::

    tokenize:
      text:  {tokenizer: open_clip, max_length: 77}
      image: {model: models/tiny-vq, resolution: 64, policy: center_crop, batch_size: 64}

Each stage stores its outputs as tar members (``KEY.text_ids.npy``, ``KEY.image_ids.npy`` or
``KEY.latents.npy``), puts its fingerprint id in a scalar column (hence in the parquet and each
sample's json) and returns the full fingerprint from ``fingerprint()`` for the manifest.
"""
from __future__ import annotations

from typing import Any

from pipeline.core.config import ConfigError
from pipeline.core.stage import Stage
from .config import ImageTokenizeConfig, TextTokenizeConfig, TokenizeConfig, parse
from .text import TextTokenizeStage
from .visual import VisualTokenizeStage

__all__ = ["build_tokenizers", "TokenizeConfig", "TextTokenizeConfig", "ImageTokenizeConfig",
           "TextTokenizeStage", "VisualTokenizeStage"]


def build_tokenizers(cfg: dict[str, Any], spec: Any = None, load: bool = True) -> list[Stage]:
    """The stages of a ``tokenize:`` section (text first, then image).

    ``spec`` (the job) is accepted for symmetry with ``build_filters``; the stages read what they
    need from each sample's files. Options are validated either way. ``load=False`` stops there (no file or hub access);
    otherwise the visual checkpoint is resolved and the options that depend on it are checked,
    so a bad resolution or a missing model fails the job before any shard runs.
    """
    text, image = parse(cfg)
    stages: list[Stage] = []
    if text is not None:
        stages.append(TextTokenizeStage(text))
    if image is not None:
        stages.append(VisualTokenizeStage(image))
    if load:
        for stage in stages:
            try:
                if isinstance(stage, VisualTokenizeStage):
                    stage.check()
                else:
                    stage.setup()  # a tokenizer that does not load should fail here, not per shard
            except ConfigError as e:
                where = "image" if isinstance(stage, VisualTokenizeStage) else "text"
                raise ConfigError(f"tokenize.{where}.{e}") from None
    return stages
