"""Pre-tokenization stages: text ids, discrete visual ids (VQ) and VAE latents, computed once at
curation time so that no training epoch runs the encoder again.

The job's ``tokenize:`` section::

    tokenize:
      text:  {tokenizer: open_clip, max_length: 77}
      image: {model: path/or/hub-id, resolution: 64, policy: center_crop, batch_size: 64}

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


def build_tokenizers(section: dict[str, Any], check: bool = False) -> list[Stage]:
    """The stages of a ``tokenize:`` section (text first, then image).

    Options are always validated, without file or hub access. With ``check`` each stage's
    ``check()`` also runs (the driver does this before any shard): the text tokenizer loads and
    the visual checkpoint is resolved, with the options that depend on it, so a bad resolution or
    a missing model fails the job before any shard runs.
    """
    text, image = parse(section)
    stages: list[tuple[str, Stage]] = []
    if text is not None:
        stages.append(("text", TextTokenizeStage(text)))
    if image is not None:
        stages.append(("image", VisualTokenizeStage(image)))
    for where, stage in stages if check else ():
        try:
            stage.check()
        except ConfigError as e:
            raise ConfigError(f"tokenize.{where}.{e}") from None
    return [stage for _, stage in stages]
