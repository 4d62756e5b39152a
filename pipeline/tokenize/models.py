"""Visual tokenizers behind one interface: ``encode(pixels) -> one array per sample``.

``pixels`` is a float tensor (B, T, C, H, W) in [-1, 1] (Emu3, Chameleon and the diffusers VAEs all
normalise to that range); T is 1 for images. Each adapter loads its checkpoint the way a user
would (``from_pretrained(PATH)``), except for the VQ model inside a full Emu3/Chameleon checkpoint,
whose tensors are read alone so the language model is never loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np
import torch

from pipeline.core.config import ConfigError

from .checkpoint import Checkpoint
from .common import ids_dtype

VQ_PREFIX = "vqmodel."  # the VQ model's tensors inside a full Emu3 / Chameleon checkpoint


def vq_keys(key: str) -> bool:
    return VQ_PREFIX in key


@dataclass(frozen=True)
class ModelInfo:
    """What the stage needs to know about a checkpoint, read from its config without the weights."""

    cls: str
    kind: str                      # "vq" (discrete ids) or "vae" (continuous latents)
    spatial_factor: int            # pixels per grid cell along each side
    temporal_factor: int           # frames per temporal step; 1: frames are coded one by one
    codebook_size: Optional[int] = None
    latent_channels: Optional[int] = None
    scaling_factor: Optional[float] = None
    shift_factor: Optional[float] = None
    submodel: bool = False         # the VQ is part of a full multimodal checkpoint
    force_upcast: bool = False     # the checkpoint must run in float32 when float16 is asked (SDXL VAE)

    @property
    def output(self) -> str:
        return "image_ids.npy" if self.kind == "vq" else "latents.npy"

    @property
    def id_dtype(self) -> Optional[str]:
        return ids_dtype(self.codebook_size).name if self.kind == "vq" else None


class VisualModel:
    """A loaded visual tokenizer on one device."""

    name: ClassVar[str]

    def __init__(self, info: ModelInfo, checkpoint: Checkpoint, device: torch.device, latents: str = "mean"):
        self.info = info
        self.checkpoint = checkpoint
        self.device = device
        self.latents = latents
        self.model = self.load().to(device).eval()
        if info.kind == "vq":
            codebook_in_fp32(self.model.quantize)

    @classmethod
    def inspect(cls, config: dict, submodel: bool) -> ModelInfo:
        raise NotImplementedError

    def load(self) -> torch.nn.Module:
        raise NotImplementedError

    def encode(self, pixels: torch.Tensor) -> list[np.ndarray]:
        raise NotImplementedError


class Emu3Tokenizer(VisualModel):
    """transformers' Emu3VQVAE: images give (h, w) ids; clips give (t, h, w) with its temporal compression."""

    name = "Emu3VQVAE"

    @classmethod
    def inspect(cls, config: dict, submodel: bool) -> ModelInfo:
        c = _hf_config("Emu3VQVAEConfig", config)
        return ModelInfo(cls.name, "vq", 2 ** (len(c.channel_multiplier) - 1), c.temporal_downsample_factor,
                         codebook_size=c.codebook_size, latent_channels=c.latent_channels, submodel=submodel)

    def load(self) -> torch.nn.Module:
        from transformers import Emu3VQVAE

        return _load_vq(Emu3VQVAE, "Emu3VQVAEConfig", self.checkpoint, self.info.submodel)

    def encode(self, pixels: torch.Tensor) -> list[np.ndarray]:
        m = self.model
        if pixels.shape[1] == 1:  # an image: encode() repeats it over the temporal window itself
            sizes = torch.tensor([list(pixels.shape[-2:])] * pixels.shape[0])
            # one batch, one size: the per-image crops are equal, so one copy to the host
            return list(torch.stack(m.encode(pixels[:, 0], sizes).image_tokens).cpu().numpy())
        # A clip: encode() would crop the (t, h, w) grid as if it were an image (t by h, h by w),
        # so run its three parts without the crop.
        hidden = m.encoder(pixels.to(m.dtype))
        conv = m.quant_conv(hidden.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)
        return list(m.quantize(conv).cpu().numpy())


class ChameleonTokenizer(VisualModel):
    """transformers' ChameleonVQVAE: (h, w) ids per image; a clip is coded frame by frame."""

    name = "ChameleonVQVAE"

    @classmethod
    def inspect(cls, config: dict, submodel: bool) -> ModelInfo:
        c = _hf_config("ChameleonVQVAEConfig", config)
        return ModelInfo(cls.name, "vq", 2 ** (len(c.channel_multiplier) - 1), 1,
                         codebook_size=c.num_embeddings, latent_channels=c.latent_channels, submodel=submodel)

    def load(self) -> torch.nn.Module:
        from transformers import ChameleonVQVAE

        return _load_vq(ChameleonVQVAE, "ChameleonVQVAEConfig", self.checkpoint, self.info.submodel)

    def encode(self, pixels: torch.Tensor) -> list[np.ndarray]:
        b, t, c, h, w = pixels.shape
        ids = self.model.encode(pixels.reshape(b * t, c, h, w)).image_tokens
        f = self.info.spatial_factor
        return [g[0] if t == 1 else g for g in ids.view(b, t, h // f, w // f).cpu().numpy()]


class VAEEncoder(VisualModel):
    """diffusers' AutoencoderKL (the ``vae`` extra): float16 latents (C, h, w), per frame for clips."""

    name = "AutoencoderKL"

    @classmethod
    def inspect(cls, config: dict, submodel: bool) -> ModelInfo:
        return ModelInfo(cls.name, "vae", 2 ** (len(config.get("block_out_channels", (64,))) - 1), 1,
                         latent_channels=config.get("latent_channels", 4),
                         scaling_factor=config.get("scaling_factor", 0.18215),
                         shift_factor=config.get("shift_factor"), force_upcast=bool(config.get("force_upcast")))

    def load(self) -> torch.nn.Module:
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ConfigError("model_class: AutoencoderKL needs diffusers: pip install 'mmcurate[vae]'") from None
        return AutoencoderKL.from_pretrained(self.checkpoint.root, torch_dtype=torch.float32)

    def encode(self, pixels: torch.Tensor) -> list[np.ndarray]:
        b, t, c, h, w = pixels.shape
        dist = self.model.encode(pixels.reshape(b * t, c, h, w)).latent_dist
        z = dist.mean if self.latents == "mean" else dist.parameters  # moments: mean and logvar
        z = z.float().view(b, t, *z.shape[1:]).cpu().numpy().astype(np.float16)
        return [s[0] if t == 1 else s for s in z]


MODELS: dict[str, type[VisualModel]] = {m.name: m for m in (Emu3Tokenizer, ChameleonTokenizer, VAEEncoder)}
_MODEL_TYPES = {"emu3_vqgan": ("Emu3VQVAE", False), "emu3": ("Emu3VQVAE", True),
                "chameleon_vqgan": ("ChameleonVQVAE", False), "chameleon": ("ChameleonVQVAE", True)}


def detect(config: dict, explicit: Optional[str] = None) -> ModelInfo:
    """The ModelInfo of a checkpoint from its config.json (transformers or diffusers)."""
    detected, submodel = _MODEL_TYPES.get(config.get("model_type"), (None, False))
    if config.get("_class_name") == "AutoencoderKL":
        detected = "AutoencoderKL"
    if explicit and detected and explicit != detected:
        raise ConfigError(f"model_class: {explicit} given but the checkpoint holds a {detected}")
    name = explicit or detected
    if name is None:
        raise ConfigError(f"model_class: cannot tell the model from its config.json "
                          f"(model_type={config.get('model_type')!r}); set one of {', '.join(MODELS)}")
    if submodel and "vq_config" not in config:
        raise ConfigError(f"model: the {config.get('model_type')} checkpoint has no vq_config")
    return MODELS[name].inspect(config["vq_config"] if submodel else config, submodel)


def weight_filter(config: dict):
    """Which tensors a checkpoint's visual tokenizer needs (for downloads and the weights hash)."""
    return vq_keys if _MODEL_TYPES.get(config.get("model_type"), (None, False))[1] else None


def _hf_config(name: str, data: dict):
    import transformers

    return getattr(transformers, name).from_dict(data)


def _load_vq(cls, config_name: str, checkpoint: Checkpoint, submodel: bool) -> torch.nn.Module:
    if not submodel:
        return cls.from_pretrained(checkpoint.root, dtype=torch.float32)
    from safetensors import safe_open

    model = cls(_hf_config(config_name, checkpoint.config()["vq_config"]))
    state = {}
    for path in checkpoint.weight_files(vq_keys):
        if path.suffix != ".safetensors":
            raise ConfigError(f"model: reading the VQ part of {path.name} needs safetensors weights")
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if vq_keys(key):
                    state[key[key.index(VQ_PREFIX) + len(VQ_PREFIX):]] = f.get_tensor(key).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ConfigError(f"model: the VQ weights in {checkpoint.given} do not fit {cls.__name__} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def codebook_in_fp32(quantizer: torch.nn.Module) -> None:
    """Run the nearest-code search in float32 even under bf16 autocast: bf16 distances to tens of
    thousands of codes tie and flip ids."""
    forward = quantizer.forward

    def run(hidden: torch.Tensor, *args, **kwargs):
        with torch.autocast(hidden.device.type, enabled=False):
            return forward(hidden.float(), *args, **kwargs)

    quantizer.forward = run
