"""An output directory, written atomically: every file goes to a hidden temporary name, is
fsync'd and renamed, so a final name always holds a complete file and a killed run leaves only
temporaries, which the next run sweeps. Sinks and the job's manifest write through it; it is the
one place that knows where the bytes go (a local folder, or a shared mount on a cluster)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

TEMPORARY = ".{name}.tmp"


class Directory:
    def __init__(self, root: Union[str, os.PathLike]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Directory({str(self.root)!r})"

    def path(self, name: str) -> Path:
        return self.root / name

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def read_bytes(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size

    def names(self, pattern: str) -> list[str]:
        """The names of the complete files matching a glob ``pattern``, sorted."""
        return sorted(p.name for p in self.root.glob(pattern))

    def write(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically."""
        path = self.root / name
        tmp = path.with_name(TEMPORARY.format(name=path.name))
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def remove_temporaries(self) -> int:
        """Delete what a killed run left half-written; returns how many files."""
        leftovers = list(self.root.glob(TEMPORARY.format(name="*")))
        for p in leftovers:
            p.unlink(missing_ok=True)
        return len(leftovers)
