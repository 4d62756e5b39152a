"""One run at a time per output directory: a second ``mmcurate run`` into a directory in use would
sweep the first one's temporaries and write the same shards; it is refused, naming the holder.

* On a local disk (or a shared mount): ``fcntl.flock`` on ``.mmcurate.lock`` in the directory.
  The kernel releases it when the holder exits, however it exits (kill -9 included), so there is
  never a stale lock to clear. The file holds the holder's pid, host and start, for the message;
  the holder removes it on release (a contender checks that the file it locked is still the one
  at that name, so removing it cannot let two runs in).
* On an object store, which has no locks: a lease object ``.mmcurate.lock`` holding the owner and
  an expiry, renewed by a thread every third of ``LEASE_SECONDS``. A fresh lease of another run
  refuses this one; an expired lease (its holder crashed), or one whose holder no longer runs on
  this host, is taken over. Taking a lease writes it, waits ``SETTLE_SECONDS`` and reads it back:
  of two runs starting together the last writer wins and the other refuses (a race remains only
  for writes more than ``SETTLE_SECONDS`` apart after both found the directory free).

The name starts with a dot, so :meth:`Directory.names` never lists it.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator, Optional

from pipeline.sinks.storage import Directory

LOCK = ".mmcurate.lock"
LEASE_SECONDS = 60.0   # a crashed run's lease blocks the directory at most this long
SETTLE_SECONDS = 0.5   # between writing a lease and reading it back

log = logging.getLogger("mmcurate")


class OutputInUse(Exception):
    """Another run holds the output directory."""


@contextlib.contextmanager
def hold(directory: Directory, lease_seconds: float = LEASE_SECONDS) -> Iterator[None]:
    """Hold ``directory`` (which must exist) for the duration; raises OutputInUse if another run does."""
    lock = _FileLock(directory) if directory.local else _Lease(directory, lease_seconds)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _refusal(directory: Directory, holder: Optional[dict[str, Any]], why: str) -> OutputInUse:
    who = (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}" if holder
           else "a process that has not yet said who it is")
    return OutputInUse(f"{directory} is in use by another mmcurate run ({who}); {why}")


class _FileLock:
    def __init__(self, directory: Directory) -> None:
        self.directory = directory
        self.path = os.path.join(directory.local, LOCK)
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 4096, 0))
                os.close(fd)
                raise _refusal(self.directory, holder, "wait for it to end, or stop it (its lock goes "
                               "with its process)") from None
            except OSError as e:  # a filesystem without locks (some network mounts)
                log.warning("cannot lock %s (%s); running without protection against a second run", self.path, e)
                os.close(fd)
                return
            try:
                current = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # still locked: a contender that opened it sees it is gone
        os.close(self.fd)
        self.fd = None


class _Lease:
    def __init__(self, directory: Directory, seconds: float) -> None:
        self.directory = directory
        self.seconds = seconds
        self.token = uuid.uuid4().hex
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def acquire(self) -> None:
        held = self._read()
        if held is not None:
            stale = _stale(held)
            if not stale:
                raise _refusal(self.directory, held, f"its lease expires at {_when(held.get('expires'))} "
                               "unless renewed; wait for it to end, or stop it")
            log.warning("taking over the lease on %s (%s)", self.directory, stale)
        self._write()
        time.sleep(SETTLE_SECONDS)
        held = self._read()
        if not held or held.get("token") != self.token:
            raise _refusal(self.directory, held, "it took the lease as this run did")
        self.thread = threading.Thread(target=self._renew, name="mmcurate-lease", daemon=True)
        self.thread.start()

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        try:
            held = self._read()
            if held and held.get("token") == self.token:
                self.directory.remove(LOCK)
        except OSError as e:
            log.warning("could not remove the lease on %s (%s); it expires by itself", self.directory, e)

    def _renew(self) -> None:
        while not self.stop.wait(self.seconds / 3):
            try:
                held = self._read()
                if not held or held.get("token") != self.token:
                    log.error("the lease on %s was taken by another run (%s); both may be writing there",
                              self.directory, held)
                    return
                self._write()
            except Exception as e:  # a store hiccup: the next renewal tries again before expiry
                log.warning("could not renew the lease on %s: %s", self.directory, e)

    def _read(self) -> Optional[dict[str, Any]]:
        """The lease as stored; None if there is none, {} if it is unreadable (treated as stale)."""
        try:
            return _parse(self.directory.read_bytes(LOCK)) or {}
        except FileNotFoundError:
            return None

    def _write(self) -> None:
        lease = {**_owner(), "token": self.token, "expires": time.time() + self.seconds}
        self.directory.write(LOCK, json.dumps(lease).encode())


def _parse(data: bytes) -> Optional[dict[str, Any]]:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _stale(held: dict[str, Any]) -> Optional[str]:
    """Why a lease no longer protects anyone, or None while its holder may be running."""
    expires = held.get("expires")
    if not isinstance(expires, (int, float)):
        return "it is unreadable"
    if time.time() >= expires:
        return f"it expired at {_when(expires)}: pid {held.get('pid')} on {held.get('host')} stopped renewing it"
    if held.get("host") == socket.gethostname() and not _running(held.get("pid")):
        return f"pid {held.get('pid')} no longer runs on this host"
    return None


def _running(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as e:  # EPERM: it exists, owned by someone else
        return e.errno == errno.EPERM
    return True


def _when(timestamp: Any) -> str:
    if not isinstance(timestamp, (int, float)):
        return "an unknown time"
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(timespec="seconds")
