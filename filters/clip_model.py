"""Load an open_clip model, its tokenizer and its own preprocessing: the path users take.

``model`` is an open_clip architecture name (``ViT-B-32``), a ``hf-hub:``/``local-dir:`` identifier,
or the path of a model config JSON (registered with ``open_clip.add_model_config``; a relative
``tokenizer_kwargs.bpe_path`` in it is read relative to the JSON, so a config and its vocabulary can
live together, as in ``pipeline/testing/models/tiny-clip``). ``pretrained`` is an open_clip tag (fetched from the hub),
a checkpoint path, or ``random`` for random weights (benchmarks only).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

RANDOM_WEIGHTS = "random"
TORCH_RESIZE_MODES = ("shortest",)  # what the tensor decode path implements of open_clip's resize modes
_REGISTERED: set[Path] = set()  # config files already given to open_clip (each add rescans all configs)


def resolve_precision(precision: str, device: str) -> str:
    """"bf16" (autocast) or "fp32": ``auto`` is bf16 on CUDA."""
    return "bf16" if precision == "bf16" or (precision == "auto" and device == "cuda") else "fp32"


def resolve_decode(decode: str, device: str, resize_mode: Optional[str]) -> str:
    """"torch" or "pil": ``auto`` is the tensor path on CUDA when it implements the model's resize
    mode (None: not known yet, so PIL, which does every mode)."""
    if decode != "auto":
        return decode
    return "torch" if device == "cuda" and resize_mode in TORCH_RESIZE_MODES else "pil"


@dataclass
class ClipModel:
    model: Any                 # open_clip CLIP in eval mode, on ``device``
    preprocess: Callable       # open_clip's inference transform: PIL image -> normalised tensor
    tokenizer: Callable        # list[str] -> LongTensor[n, context_length]
    device: Any                # torch.device
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str         # "bicubic" or "bilinear"
    resize_mode: str           # "shortest", "longest" or "squash"


def is_config_path(model: str) -> bool:
    return model.endswith(".json") and os.path.isfile(model)


def absolute_if_path(value: str | None) -> str | None:
    """Make local paths absolute (workers may run in another directory); leave names and tags."""
    if value and os.path.exists(value):
        return os.path.abspath(value)
    return value


def register_model(model: str) -> tuple[str, dict[str, Any]]:
    """Resolve ``model`` to an open_clip model name and the tokenizer kwargs its config implies."""
    import open_clip

    if not is_config_path(model):
        return model, {}
    path = Path(model).resolve()
    if path not in _REGISTERED:
        open_clip.add_model_config(path)
        _REGISTERED.add(path)
    name = path.stem
    cfg = open_clip.get_model_config(name) or {}
    kwargs = dict(cfg.get("text_cfg", {}).get("tokenizer_kwargs") or {})
    bpe = kwargs.get("bpe_path")
    if bpe and not os.path.isabs(bpe):
        kwargs["bpe_path"] = str(path.parent / bpe)
    return name, kwargs


def preprocess_config(model: str, pretrained: str | None) -> dict[str, Any] | None:
    """The inference preprocessing open_clip will give ``model`` with ``pretrained``
    (``resize_mode``, ``interpolation``, mean and std; ``size`` is the model's own once built),
    read without the weights and merged as open_clip does: its defaults, then the tag's (built-in
    names) or the config file's (``local-dir:``, ``hf-hub:``). None when it cannot be known
    before loading (a hub config that cannot be fetched now)."""
    import json
    from dataclasses import asdict

    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    base = asdict(PreprocessCfg())
    if model.startswith("local-dir:"):
        path = Path(model[len("local-dir:"):]) / "open_clip_config.json"
        if not path.is_file():
            return None
        return merge_preprocess_dict(base, json.loads(path.read_text()).get("preprocess_cfg", {}))
    if model.startswith("hf-hub:"):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model[len("hf-hub:"):], "open_clip_config.json")
        except Exception:  # noqa: BLE001 - offline or not there: decided when loading
            return None
        return merge_preprocess_dict(base, json.loads(Path(path).read_text()).get("preprocess_cfg", {}))
    name, _ = register_model(model)
    tag = open_clip.get_pretrained_cfg(name, pretrained) if pretrained and pretrained != RANDOM_WEIGHTS else {}
    return merge_preprocess_dict(base, tag or {})


def load_clip(model: str, pretrained: str | None, device: str = "cpu") -> ClipModel:
    import open_clip
    import torch

    name, tokenizer_kwargs = register_model(model)
    weights = None if pretrained in (None, RANDOM_WEIGHTS) else pretrained
    net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=device)
    net.eval()
    cfg = net.visual.preprocess_cfg
    size = cfg["size"]
    return ClipModel(
        model=net, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(name, **tokenizer_kwargs),
        device=torch.device(device), image_size=size if isinstance(size, int) else size[0],
        mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=cfg.get("interpolation") or "bicubic",
        resize_mode=cfg.get("resize_mode") or "shortest",
    )


def file_digest(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a checkpoint file, for stage fingerprints."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def embedding_width(model: str) -> int | None:
    """The width of ``model``'s image embedding, read from its config without the weights (None:
    not known before loading, as for an ``hf-hub:`` model)."""
    import json

    import open_clip

    if model.startswith("local-dir:"):
        path = Path(model[len("local-dir:"):]) / "open_clip_config.json"
        cfg = json.loads(path.read_text()).get("model_cfg", {}) if path.is_file() else {}
    elif model.startswith("hf-hub:"):
        cfg = {}
    else:
        cfg = open_clip.get_model_config(register_model(model)[0]) or {}
    return cfg.get("embed_dim")
