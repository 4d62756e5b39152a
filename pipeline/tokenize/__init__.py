"""Pre-tokenization stages: text ids, discrete visual ids (VQ) and VAE latents, computed once at
curation time so that no training epoch runs the encoder again.

The job's ``tokenize:`` section::

    tokenize:
      text:  {tokenizer: open_clip, max_length: 77}
      image: {model: path/or/hub-id, resolution: 64, policy: center_crop, batch_size: 64}
      sequence: {mapping: emu3, order: text_first}   # after both: one training sequence per sample

Each stage stores its outputs as tar members (``KEY.text_ids.npy``, ``KEY.image_ids.npy`` or
``KEY.latents.npy``; the sequence stage ``KEY.sequence.npy`` and ``KEY.spans.npy``), puts its
fingerprint id in a scalar column (hence in the parquet and each sample's json) and returns the
full fingerprint from ``fingerprint()`` for the manifest. On interleaved documents
(``pipeline.core.document``) the text stage runs on each text segment and the image stage on each
kept image (their ``document_view``, through ``SegmentStage``: members ``text_NNN.text_ids.npy``,
``image_NNN.image_ids.npy``); the sequence stage composes each document whole, in reading order.
"""
from __future__ import annotations

from typing import Any

from pipeline.core.config import ConfigError
from pipeline.core.stage import Stage

from .config import ImageTokenizeConfig, SequenceTokenizeConfig, TextTokenizeConfig, TokenizeConfig, parse
from .sequence import SequenceStage
from .text import TextTokenizeStage
from .visual import VisualTokenizeStage

__all__ = ["build_tokenizers", "TokenizeConfig", "TextTokenizeConfig", "ImageTokenizeConfig", "SequenceTokenizeConfig",
           "TextTokenizeStage", "VisualTokenizeStage", "SequenceStage"]


def build_tokenizers(section: dict[str, Any], check: bool = False) -> list[Stage]:
    """The stages of a ``tokenize:`` section (text first, then image, then the sequence).

    Options are always validated, without file or hub access. With ``check`` each stage's
    ``check()`` also runs (the driver does this before any shard): the text tokenizer loads and
    the visual checkpoint is resolved, with the options that depend on it, so a bad resolution or
    a missing model fails the job before any shard runs; the sequence is checked against both
    (the text ids in its vocabulary, a visual token for every code).
    """
    text, image, sequence = parse(section)
    stages: list[tuple[str, Stage]] = []
    if text is not None:
        stages.append(("text", TextTokenizeStage(text)))
    if image is not None:
        stages.append(("image", VisualTokenizeStage(image)))
    if sequence is not None:
        stages.append(("sequence", SequenceStage(sequence)))
    for where, stage in stages if check else ():
        try:
            stage.check()
        except ConfigError as e:
            raise ConfigError(f"tokenize.{where}.{e}") from None
    if check and sequence is not None:
        built = dict(stages)
        info = built["image"].info
        try:
            built["sequence"].check_inputs(built["text"].fingerprint(), info.codebook_size, info.kind)
        except ConfigError as e:
            raise ConfigError(f"tokenize.{e}") from None
    return [stage for _, stage in stages]
