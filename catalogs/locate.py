"""Turn ``input.files`` entries into readable file URLs for a card.

An entry may be a local file, an fsspec URL, a local folder (a copy of the dataset's metadata: the
card's file patterns are matched inside it), a zip archive (its members are read in place), or a
Hugging Face dataset: ``hf://datasets/ORG/NAME[/PATTERN]`` or the card's repo id. Hub datasets are
streamed file by file through ``HfFileSystem``; with ``HF_HUB_OFFLINE=1`` they come from the local
Hugging Face cache (``huggingface-cli download`` fills it).
"""
from __future__ import annotations

import fnmatch
import os
import zipfile
from pathlib import Path
from typing import Optional

from pipeline.core.config import ConfigError

from .card import Card

SUFFIXES = {"parquet": (".parquet",), "csv": (".csv",), "tsv": (".tsv", ".tsv.gz", ".txt"),
            "jsonl": (".jsonl", ".json", ".ndjson"), "json": (".json",), "txt": (".txt",)}


def resolve_files(card: Card, files: list[str]) -> list[str]:
    out: list[str] = []
    for entry in files:
        repo, pattern = hub_reference(card, entry)
        if repo is not None:
            out.extend(hub_files(repo, [pattern] if pattern else default_patterns(card)))
        elif "://" not in entry and os.path.isdir(entry):
            # the published names first; a renamed copy still matches the format's suffixes
            out.extend(_match(Path(entry), default_patterns(card)) or _match(Path(entry), suffix_patterns(card))
                       or _nothing(entry, card))
        else:
            out.append(entry)
    return [m for path in out for m in _zip_members(card, path)]


def hub_reference(card: Card, entry: str) -> tuple[Optional[str], Optional[str]]:
    """``(repo_id, pattern)`` when ``entry`` names a Hugging Face dataset, else ``(None, None)``."""
    text = entry.strip()
    if text.startswith("hf://datasets/"):
        parts = text[len("hf://datasets/"):].strip("/").split("/")
        if len(parts) < 2:
            raise ConfigError(f"input.files: {entry!r} is not hf://datasets/ORG/NAME[/PATTERN]")
        pattern = "/".join(parts[2:]) or None
        return "/".join(parts[:2]), pattern
    repo = card.metadata.hf_repo
    if repo and text.removeprefix("datasets/").lower() == repo.lower() and not os.path.exists(text):
        return repo, None
    return None, None


def default_patterns(card: Card) -> list[str]:
    return list(card.metadata.files) if card.metadata.files else suffix_patterns(card)


def suffix_patterns(card: Card) -> list[str]:
    suffixes = SUFFIXES.get(card.metadata.format or "", ()) + ((".zip",) if card.metadata.compression == "zip" else ())
    return [f"*{s}" for s in suffixes]


def hub_files(repo: str, patterns: list[str]) -> list[str]:
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            root = snapshot_download(repo_id=repo, repo_type="dataset", allow_patterns=patterns,
                                     local_files_only=True)
        except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
            raise ConfigError(
                f"input.files: hf://datasets/{repo} is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                f"is set; fetch it with `huggingface-cli download --repo-type dataset {repo} "
                f"--include '{patterns[0]}'` or unset HF_HUB_OFFLINE ({type(e).__name__})") from None
        found = _match(Path(root), patterns)
    else:
        from huggingface_hub import HfFileSystem

        fs = HfFileSystem()
        found = sorted({p for pat in patterns for p in fs.glob(f"datasets/{repo}/{pat}")})
        found = [f"hf://{p}" for p in found]
    if not found:
        raise ConfigError(f"input.files: no file in hf://datasets/{repo} matches {patterns}")
    return found


def _match(root: Path, patterns: list[str]) -> list[str]:
    """Files under ``root`` whose relative path matches a pattern (``*`` also crosses folders)."""
    rel = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [str(root / r) for r in rel
            if any(fnmatch.fnmatch(r, pat) or fnmatch.fnmatch(r.rsplit("/", 1)[-1], pat) for pat in patterns)]


def _nothing(entry: str, card: Card) -> list[str]:
    raise ConfigError(f"input.files: no file in folder {entry!r} matches the {card.name} file patterns "
                      f"{default_patterns(card) + suffix_patterns(card)}")


def _zip_members(card: Card, path: str) -> list[str]:
    """A local ``.zip`` becomes one ``zip://MEMBER::PATH`` URL per data member; anything else passes."""
    if "://" in path or not path.lower().endswith(".zip"):
        return [path]
    suffixes = SUFFIXES.get(card.metadata.format or "", ())
    with zipfile.ZipFile(path) as z:
        members = sorted(n for n in z.namelist() if not n.endswith("/") and
                         (not suffixes or n.lower().endswith(suffixes)))
    if not members:
        raise ConfigError(f"input.files: {path} holds no {card.metadata.format} file")
    return [f"zip://{m}::{path}" for m in members]
