"""Options of the ``tokenize:`` section of a job, read through :func:`pipeline.core.config.from_dict`.

Only what can be checked without the model lives here; rules that need the checkpoint's config
(resolution a multiple of its downsampling, frames a multiple of its temporal factor) are checked
when the stage is built (see ``VisualTokenizeStage.check``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

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


@dataclass
class TokenizeConfig:
    """The section itself. Its parts stay plain mappings here and are read by :func:`parse`: an
    Optional[dataclass] field would report only "expected a mapping or null" for a nested error."""

    text: Optional[dict[str, Any]] = None
    image: Optional[dict[str, Any]] = None


def parse(cfg: Any, path: str = "tokenize") -> tuple[Optional[TextTokenizeConfig], Optional[ImageTokenizeConfig]]:
    section = from_dict(TokenizeConfig, cfg, path)
    text = None if section.text is None else from_dict(TextTokenizeConfig, section.text, f"{path}.text")
    image = None if section.image is None else from_dict(ImageTokenizeConfig, section.image, f"{path}.image")
    return text, image
