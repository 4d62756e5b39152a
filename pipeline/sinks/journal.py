"""Replacing a shard that is already complete (``mmcurate retry``), so that a kill at any moment
leaves either the old shard or the new one, never a mix.

A fresh shard is committed file by file with its stats last; that is not enough for a shard
being replaced, because between its new tar and its new stats the old stats would describe the
wrong files. So the shard's new files are first committed together, as one file: the journal
``NNNNN_retry.tar`` (a tar of the files, in commit order). Then each file is committed over the
old one, the stats last, the shard's files that the new stats do not list are removed (a column
file the new shard no longer has), and the journal is removed. The next ``open()`` of the sink finishes a
journal a killed run left behind, before anything reads the shard: finishing is repeatable, so a
kill while finishing is harmless too. Committing the journal is the moment the new shard exists.
"""
from __future__ import annotations

import io
import tarfile

from typing import Callable

from pipeline.sinks.storage import Directory

SUFFIX = "_retry.tar"
Tidy = Callable[[str], None]  # removes the files of a shard (its name) that its new stats do not list


def journal_name(shard: str) -> str:
    return f"{shard}{SUFFIX}"


def replace(directory: Directory, shard: str, files: dict[str, bytes], tidy: Tidy) -> None:
    """Replace the files of ``shard`` (its name, ``00003``) by ``files`` (name -> bytes, commit
    order, the stats last)."""
    name = journal_name(shard)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for file, data in files.items():
            info = tarfile.TarInfo(file)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    directory.write(name, buf.getvalue())
    _apply(directory, name, files, tidy)


def finish(directory: Directory, tidy: Tidy) -> int:
    """Finish every journal a killed run left; returns how many there were."""
    names = directory.names(f"[0-9]*{SUFFIX}")
    for name in names:
        with tarfile.open(fileobj=io.BytesIO(directory.read_bytes(name)), mode="r:") as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        _apply(directory, name, files, tidy)
    return len(names)


def _apply(directory: Directory, name: str, files: dict[str, bytes], tidy: Tidy) -> None:
    for file, data in files.items():
        directory.write(file, data)
    tidy(name[:-len(SUFFIX)])
    directory.remove(name)
