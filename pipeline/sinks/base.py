"""The sink contract: where finished shards go. One output format behind one interface, so
executors write shards without knowing the format or the storage, and the job asks the sink
which shards are already done.

    open()                      in the driver, before the first shard: prepare the destination,
                                sweep what a killed run left half-written
    complete_shards()           the ids of the shards whose record is committed, read from storage
                                (one listing): they are never redone
    write(shard_id, batch, stats) -> stats
                                commit one settled shard (see ``schema.settle``); its stats are
                                written last and are the commit marker; returns them as written
    read_stats(shard_id)        the stats of a complete shard
    verified_stats(shard_id, checksums, status)
                                the stats of a complete shard about to be skipped, once its files
                                are checked to be as written; raises DamagedShard (and un-commits
                                the shard) when they are not, so the shard is redone
    read_status(shard_id)       the status table of a complete shard (ordered stages replay it)
    finish() -> index           after the last shard: whatever spans shards (the shard index)

A sink is pickled to the workers that write (on Ray, write tasks, which write straight to the
storage), so it holds only its configuration, never open files.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from pipeline.core.schema import Batch
from pipeline.sinks.storage import Directory


class DamagedShard(Exception):
    """A complete shard whose files are no longer as written (truncated, changed, unreadable)."""


class Sink(ABC):
    def __init__(self, directory: Directory) -> None:
        self.directory = directory

    def open(self) -> int:
        """Create the destination; returns how many partial files of a killed run were removed."""
        self.directory.create()
        return self.directory.remove_temporaries()

    @abstractmethod
    def complete_shards(self) -> set[int]: ...

    def is_complete(self, shard_id: int) -> bool:
        return shard_id in self.complete_shards()

    @abstractmethod
    def write(self, shard_id: int, batch: Batch, stats: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    def read_stats(self, shard_id: int) -> dict[str, Any]: ...

    @abstractmethod
    def read_status(self, shard_id: int) -> Batch: ...

    def verified_stats(self, shard_id: int, checksums: bool = False, status: bool = False) -> dict[str, Any]:
        """The stats of complete shard ``shard_id``, if it can be skipped: ``checksums`` asks to
        read its files back and compare their checksums, ``status`` that its status table be
        readable (it will be replayed). A sink that records nothing to check only reads the stats."""
        try:
            return self.read_stats(shard_id)
        except (OSError, ValueError) as e:
            raise DamagedShard(f"its stats cannot be read ({e})") from e

    @abstractmethod
    def finish(self) -> dict[str, Any]: ...
