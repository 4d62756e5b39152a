"""Where the bytes go: a folder on the local disk (or a shared mount) or behind an fsspec URL
(``s3://``, ``gs://``, ``file://``, ``memory://``, ...). Sinks, the manifest and the commands that
read an output directory go through it; it is the one place that knows how a file is committed.

* Local: a file is written to a hidden temporary name, fsync'd and renamed, so a final name always
  holds a complete file; a killed run leaves only temporaries, which the next run sweeps.
* Object stores have no rename: a file is uploaded whole (one PUT, or a multipart upload that the
  store only shows once it completes), so a final name is again always complete. What an
  interrupted upload leaves is invisible to readers; the next run aborts it (S3).

Credentials come the ecosystem's way: the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...) or ``storage_options``, passed
to the filesystem as they are.
"""
from __future__ import annotations

import fnmatch
import os
from typing import IO, Any, Optional, Union

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.location import local_path

TEMPORARY = ".{name}.tmp"


class Directory:
    """A folder to write and read files by name. Pickled to the workers that write: it holds only
    its location and options, and opens its filesystem where it is used."""

    def __init__(self, root: Union[str, os.PathLike], storage_options: Optional[dict[str, Any]] = None) -> None:
        root = os.fspath(root)
        # Local paths are made absolute here, in the driver: workers run in other directories.
        self.local = local_path(root)
        self.url = self.local or root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self._fs: Any = None

    def __repr__(self) -> str:
        return f"Directory({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}  # filesystems hold sessions and event loops

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs = LocalFileSystem() if self.local else fsspec.core.url_to_fs(self.url, **self.storage_options)[0]
        return self._fs

    @property
    def protocol(self) -> str:
        return "file" if self.local else self.url.split("://", 1)[0]

    def _path(self, name: str = "") -> str:
        """The filesystem's own path of ``name`` (no protocol)."""
        root = self.local or self.fs._strip_protocol(self.url)
        return f"{root}/{name}" if name else root

    def path(self, name: str) -> str:
        """Where ``name`` is, as a path or URL that fsspec (and the loader) open."""
        return f"{self.url}/{name}"

    # -- reading -----------------------------------------------------------------------------------
    def is_dir(self) -> bool:
        try:
            return self.fs.isdir(self._path())
        except (FileNotFoundError, PermissionError):
            return False

    def exists(self, name: str) -> bool:
        return self.fs.exists(self._path(name))

    def open(self, name: str) -> IO[bytes]:
        return self.fs.open(self._path(name), "rb")

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self._path(name))

    def size(self, name: str) -> int:
        return self.fs.size(self._path(name))

    def names(self, pattern: str = "*") -> list[str]:
        """The names of the complete files directly in the folder matching a glob ``pattern``,
        sorted. The listing is read from storage every time (other processes write there)."""
        if self.local:
            try:
                entries = os.listdir(self.local)
            except FileNotFoundError:
                return []
        else:
            self.fs.invalidate_cache(self._path())
            try:
                entries = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._path(), detail=False)]
            except FileNotFoundError:
                return []
        return sorted(n for n in entries if _listed(n, pattern))

    def sizes(self, pattern: str = "*") -> dict[str, int]:
        """``{name: bytes}`` of the files :meth:`names` lists, from one listing (an object store's
        listing carries the sizes; on disk, one stat per entry)."""
        if self.local:
            try:
                with os.scandir(self.local) as entries:
                    return {e.name: e.stat().st_size for e in entries if e.is_file() and _listed(e.name, pattern)}
            except FileNotFoundError:
                return {}
        self.fs.invalidate_cache(self._path())
        try:
            infos = self.fs.ls(self._path(), detail=True)
        except FileNotFoundError:
            return {}
        named = ((i["name"].rstrip("/").rsplit("/", 1)[-1], i) for i in infos if i.get("type") != "directory")
        return {n: int(i["size"]) for n, i in named if _listed(n, pattern)}

    # -- writing -----------------------------------------------------------------------------------
    def create(self) -> None:
        self.fs.makedirs(self._path(), exist_ok=True)

    def write(self, name: str, data: bytes) -> None:
        """Commit ``name``: readers see all of ``data`` or the file as it was, never a part."""
        if not self.local:
            self.fs.pipe_file(self._path(name), data)
            return
        path = os.path.join(self.local, name)
        tmp = os.path.join(self.local, TEMPORARY.format(name=name))
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def remove(self, name: str) -> None:
        self.fs.rm_file(self._path(name))

    def remove_temporaries(self) -> int:
        """Delete what a killed run left half-written; returns how many files or uploads."""
        if self.local:
            leftovers = [n for n in os.listdir(self.local) if fnmatch.fnmatchcase(n, TEMPORARY.format(name="*"))]
            for n in leftovers:
                try:
                    os.unlink(os.path.join(self.local, n))
                except FileNotFoundError:
                    pass
            return len(leftovers)
        if self.protocol in ("s3", "s3a"):
            return _abort_multipart_uploads(self.fs, self._path())
        return 0


def _listed(name: str, pattern: str) -> bool:
    """Whether a listing shows ``name``: it matches and is not hidden (temporaries, the lock)."""
    return fnmatch.fnmatchcase(name, pattern) and not name.startswith(".")


def _abort_multipart_uploads(fs: Any, path: str) -> int:
    """Abort the unfinished multipart uploads under ``path`` (bucket/prefix): parts of a killed
    run's uploads, which S3 keeps (and bills) until someone aborts them."""
    bucket, _, prefix = path.partition("/")
    prefix = prefix.rstrip("/") + "/"
    uploads = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])
    for upload in uploads:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    return len(uploads)
