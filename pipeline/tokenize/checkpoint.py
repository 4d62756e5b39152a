"""Where a model checkpoint lives, resolved to local files: its config and a hash of its weights.

A checkpoint is a local directory or a Hugging Face hub id (downloaded through the hub cache, so
``HF_HUB_OFFLINE=1`` uses only what is cached). The weights hash covers tensor names, dtypes,
shapes and bytes, not the files, so re-sharding or re-saving the same weights keeps the hash.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from pipeline.core.config import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
KeyFilter = Callable[[str], bool]


def _all_keys(key: str) -> bool:
    return True


@dataclass(frozen=True)
class Checkpoint:
    given: str                 # as the job spec wrote it
    root: Path                 # the local directory holding config.json (subfolder applied)
    revision: Optional[str]    # the hub commit it resolved to; None for a local directory

    def config(self) -> dict:
        path = self.root / "config.json"
        if not path.is_file():
            raise ConfigError(f"model: no config.json in {self.root}")
        return json.loads(path.read_text())

    def weight_files(self, keys: Optional[KeyFilter] = None) -> list[Path]:
        """The weight files holding the tensors whose names pass ``keys`` (default: all)."""
        keys = keys or _all_keys
        index = sorted(self.root.glob("*.safetensors.index.json"))
        if index:
            weight_map = json.loads(index[0].read_text())["weight_map"]
            return [self.root / f for f in sorted({f for k, f in weight_map.items() if keys(k)})]
        files = sorted(self.root.glob("*.safetensors")) or sorted(self.root.glob("*.bin"))
        if not files:
            raise ConfigError(f"model: no weight files (*.safetensors, *.bin) in {self.root}")
        return files

    def weights_sha256(self, keys: Optional[KeyFilter] = None) -> str:
        keys = keys or _all_keys
        h = hashlib.sha256()
        for path in self.weight_files(keys):
            if path.suffix == ".safetensors":
                _hash_safetensors(h, path, keys)
            else:  # pickled torch weights: no cheap per-tensor access, hash the file
                h.update(path.name.encode())
                _hash_range(h, path, 0, path.stat().st_size)
        return h.hexdigest()


def _hash_safetensors(h, path: Path, keys: KeyFilter) -> None:
    """Hash the selected tensors by reading the safetensors header and the raw byte ranges."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    for name in sorted(k for k in header if k != "__metadata__" and keys(k)):
        entry = header[name]
        h.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
        start, end = entry["data_offsets"]
        _hash_range(h, path, base + start, base + end)


def _hash_range(h, path: Path, start: int, end: int, chunk: int = 8 << 20) -> None:
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            data = f.read(min(chunk, left))
            if not data:
                raise ValueError(f"{path} is truncated")
            h.update(data)
            left -= len(data)


def resolve_checkpoint(model: str, revision: Optional[str] = None, subfolder: Optional[str] = None,
                       weight_keys: Optional[Callable[[dict], Optional[KeyFilter]]] = None) -> Checkpoint:
    """Find ``model`` locally or on the hub. A diffusers pipeline without ``subfolder`` uses its
    ``vae/``. ``weight_keys(config)`` says which tensors are needed, so that only the shards holding
    them are downloaded (the VQ model inside a multi-GB Emu3/Chameleon checkpoint)."""
    local = Path(model).expanduser()
    if local.is_dir():
        return Checkpoint(model, _subdir(local, subfolder), None)
    if local.exists() or not HUB_ID.match(model):
        raise ConfigError(f"model: {model!r} is neither a checkpoint directory nor a hub id")
    snapshot = _download(model, revision, ["*.json"])
    root = _subdir(snapshot, subfolder)
    keys = weight_keys(root_config(root)) if weight_keys else None
    prefix = f"{root.relative_to(snapshot).as_posix()}/" if root != snapshot else ""
    probe = Checkpoint(model, root, snapshot.name)
    try:
        needed = [f"{prefix}{p.name}" for p in probe.weight_files(keys)]
    except ConfigError:  # no index: fetch whatever weight files the folder has
        needed = [f"{prefix}*.safetensors"]
    _download(model, revision, needed)
    if not any(root.glob("*.safetensors")):
        _download(model, revision, [f"{prefix}*.bin"])
    return probe


def root_config(root: Path) -> dict:
    path = root / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _subdir(root: Path, subfolder: Optional[str]) -> Path:
    if subfolder:
        path = root / subfolder
        if not path.is_dir():
            raise ConfigError(f"subfolder: no {subfolder!r} in {root}")
        return path
    if not (root / "config.json").is_file() and (root / "vae" / "config.json").is_file():
        return root / "vae"
    return root


def _download(repo: str, revision: Optional[str], patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated: say which model and why
        raise ConfigError(f"model: cannot fetch {repo!r} from the hub: {type(e).__name__}: {e}") from None
