"""Options of the ``tokenize:`` section of a job, read through :func:`pipeline.core.config.from_dict`.

Only what can be checked without the model lives here; rules that need the checkpoint's config
(resolution a multiple of its downsampling, frames a multiple of its temporal factor) are checked
when the stage is built (see ``VisualTokenizeStage.check``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Optional

from pipeline.core.config import ConfigError, from_dict

OPEN_CLIP = "open_clip"
VisualClass = Literal["Emu3VQVAE", "ChameleonVQVAE", "AutoencoderKL"]


def is_open_clip(name: str) -> bool:
    return name == OPEN_CLIP or name.startswith(OPEN_CLIP + ":")


@dataclass
class TextTokenizeConfig:
    # "open_clip" (its bundled BPE, offline) or "open_clip:MODEL"; a local tokenizer directory or
    # tokenizer.json file; or a Hugging Face hub id.
    tokenizer: str = OPEN_CLIP
    revision: Optional[str] = None
    max_length: Optional[int] = 77
    truncation: bool = True
    add_special_tokens: bool = True

    def validate(self) -> None:
        if not self.tokenizer:
            raise ConfigError("tokenizer: must not be empty")
        if self.max_length is not None and self.max_length <= 0:
            raise ConfigError(f"max_length: must be > 0, got {self.max_length}")
        if self.truncation and self.max_length is None:
            raise ConfigError("max_length: required when truncation is true")
        if is_open_clip(self.tokenizer):
            if not self.truncation:
                raise ConfigError("truncation: open_clip's tokenizer always truncates to max_length")
            if not self.add_special_tokens:
                raise ConfigError("add_special_tokens: open_clip's tokenizer always adds start/end tokens")


@dataclass
class ImageTokenizeConfig:
    model: str                                  # a local checkpoint directory or a hub id
    model_class: Optional[VisualClass] = None   # default: read from the checkpoint's config
    revision: Optional[str] = None              # hub revision (branch, tag or commit)
    subfolder: Optional[str] = None             # e.g. "vae" inside a diffusers pipeline repo
    resolution: int = 256                       # center_crop: side; buckets: sqrt of the area
    policy: Literal["center_crop", "buckets"] = "center_crop"
    buckets: Optional[list[list[int]]] = None   # [[height, width], ...]; default: common ratios
    frames: int = 8                             # video: frames sampled uniformly from each clip
    latents: Literal["mean", "moments"] = "mean"  # AutoencoderKL: the mean, or mean+logvar
    batch_size: int = 32
    device: Literal["auto", "cuda", "cpu"] = "auto"
    num_gpus: float = 1.0                       # per actor, when on CUDA
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # CUDA autocast; CPU runs float32
    decode_threads: Optional[int] = None        # decoding overlapped with the model; default 4 on
                                                # CUDA, 1 on CPU (more fight torch for the cores)
    prefetch_batches: int = 2                   # decoded batches kept ready ahead of the model

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model: must not be empty")
        for name in ("resolution", "frames", "batch_size", "decode_threads", "prefetch_batches"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.num_gpus < 0:
            raise ConfigError(f"num_gpus: must be >= 0, got {self.num_gpus}")
        if self.buckets is not None:
            if self.policy != "buckets":
                raise ConfigError("buckets: only used with policy: buckets")
            if not self.buckets:
                raise ConfigError("buckets: must list at least one [height, width]")
            for i, b in enumerate(self.buckets):
                if len(b) != 2 or min(b) <= 0:
                    raise ConfigError(f"buckets[{i}]: expected [height, width] > 0, got {b!r}")


SequenceMapping = Literal["emu3", "chameleon", "offset"]
OFFSET_ONLY = ("vocab_size", "visual_offset", "visual_tokens", "boi", "eoi", "eol", "bos", "eos")


@dataclass
class SequenceTokenizeConfig:
    """The training sequence of each sample (``tokenize/sequence.py``): the text and image stages'
    ids composed in one vocabulary. ``emu3`` and ``chameleon`` read their mapping from the target
    model's tokenizer (which must be the text stage's); ``offset`` is a custom vocabulary."""

    mapping: SequenceMapping
    order: Literal["text_first", "image_first"] = "text_first"  # text_first: caption -> image (generation)
    # emu3 / chameleon: a local tokenizer directory or hub id; default tokenize.text.tokenizer
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    add_bos: bool = True   # emu3 / chameleon: the tokenizer's bos / eos once around each sample
    add_eos: bool = True
    # offset: visual code i is id visual_offset + i; markers are ids; eol, bos, eos optional
    vocab_size: Optional[int] = None
    visual_offset: Optional[int] = None
    visual_tokens: Optional[int] = None  # how many visual ids; default vocab_size - visual_offset
    boi: Optional[int] = None
    eoi: Optional[int] = None
    eol: Optional[int] = None
    bos: Optional[int] = None
    eos: Optional[int] = None

    def validate(self) -> None:
        if self.mapping != "offset":
            given = [k for k in OFFSET_ONLY if getattr(self, k) is not None]
            if given:
                raise ConfigError(f"{given[0]}: only used with mapping: offset (mapping is {self.mapping})")
            return
        if self.tokenizer is not None or self.revision is not None:
            raise ConfigError("tokenizer: mapping offset takes ids, not a tokenizer")
        for key in ("vocab_size", "visual_offset", "boi", "eoi"):
            if getattr(self, key) is None:
                raise ConfigError(f"{key}: required with mapping: offset")
        if self.vocab_size <= 0:
            raise ConfigError(f"vocab_size: must be > 0, got {self.vocab_size}")
        if self.vocab_size > 1 << 32:
            raise ConfigError(f"vocab_size: at most 2**32 (ids are stored as uint32), got {self.vocab_size}")
        if not 0 <= self.visual_offset < self.vocab_size:
            raise ConfigError(f"visual_offset: must be in [0, vocab_size={self.vocab_size}), got {self.visual_offset}")
        count = self.visual_count
        if count <= 0 or self.visual_offset + count > self.vocab_size:
            raise ConfigError(f"visual_tokens: {count} visual ids from {self.visual_offset} do not fit in "
                              f"vocab_size {self.vocab_size}")
        for key in ("boi", "eoi", "eol", "bos", "eos"):
            value = getattr(self, key)
            if value is None:
                continue
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"{key}: must be in [0, vocab_size={self.vocab_size}), got {value}")
            if self.visual_offset <= value < self.visual_offset + count:
                raise ConfigError(f"{key}: {value} is a visual id (visual ids are {self.visual_offset}.."
                                  f"{self.visual_offset + count - 1})")

    @property
    def visual_count(self) -> int:
        return self.visual_tokens if self.visual_tokens is not None else self.vocab_size - self.visual_offset


@dataclass
class TokenizeConfig:
    """The section itself. Its parts stay plain mappings here and are read by :func:`parse`: an
    Optional[dataclass] field would report only "expected a mapping or null" for a nested error."""

    text: Optional[dict[str, Any]] = None
    image: Optional[dict[str, Any]] = None
    sequence: Optional[dict[str, Any]] = None


class Sections(NamedTuple):
    text: Optional[TextTokenizeConfig]
    image: Optional[ImageTokenizeConfig]
    sequence: Optional[SequenceTokenizeConfig]


def parse(cfg: Any, path: str = "tokenize") -> Sections:
    section = from_dict(TokenizeConfig, cfg, path)
    text = None if section.text is None else from_dict(TextTokenizeConfig, section.text, f"{path}.text")
    image = None if section.image is None else from_dict(ImageTokenizeConfig, section.image, f"{path}.image")
    sequence = None
    if section.sequence is not None:
        sequence = from_dict(SequenceTokenizeConfig, section.sequence, f"{path}.sequence")
        check_sequence_inputs(sequence, text, image, path)
    return Sections(text, image, sequence)


def check_sequence_inputs(sequence: SequenceTokenizeConfig, text: Optional[TextTokenizeConfig],
                          image: Optional[ImageTokenizeConfig], path: str) -> None:
    """The rules between the sequence and the stages whose ids it composes (no file is read)."""
    if text is None or image is None:
        raise ConfigError(f"{path}.sequence: needs {path}.text and {path}.image (it composes their ids)")
    if sequence.mapping == "offset":
        return
    if text.add_special_tokens:
        raise ConfigError(f"{path}.text.add_special_tokens: must be false with {path}.sequence (mapping "
                          f"{sequence.mapping} adds bos/eos once per sample, add_bos / add_eos)")
    if sequence.tokenizer is None:  # the text ids must be in the target model's vocabulary
        sequence.tokenizer, sequence.revision = text.tokenizer, text.revision
