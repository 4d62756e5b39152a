"""What bounds a Fetcher's requests: slots per key (host name, IP address), the byte budget for
bodies in memory, and parking a request that waits to retry without its caller's slot."""
from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Optional

from pipeline.core.schema import ErrorKind
from pipeline.fetch.failure import Failure


class KeyedSlots:
    """One semaphore per key (a host, an address), dropped when no request uses it (millions of
    hosts over a job)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._slots: dict[str, list] = {}  # key -> [semaphore, users]

    @contextlib.asynccontextmanager
    async def hold(self, key: str):
        slot = self._slots.setdefault(key, [asyncio.Semaphore(self._limit), 0])
        slot[1] += 1
        try:
            async with slot[0]:
                yield
        finally:
            slot[1] -= 1
            if slot[1] == 0:
                del self._slots[key]


class ByteBudget:
    """Bytes of bodies being read into memory, over all requests of a Fetcher.

    A body reserves all it may grow to before its first byte is read (its Content-Length when
    known and not encoded, else the byte cap, at most the whole budget), so a reader never waits
    midway holding a part of the budget: no two readers can wait on each other. Waiters are served
    first come, first served. ``used``/``peak`` count the bytes really buffered.
    """

    def __init__(self, limit: Optional[int]) -> None:
        self.limit = limit
        self.reserved = 0
        self.used = 0
        self.peak = 0
        self._waiters: collections.deque = collections.deque()  # (bytes, future)

    async def lease(self, size: int) -> "Lease":
        size = size if self.limit is None else min(size, self.limit)
        if self.limit is not None and (self._waiters or self.reserved + size > self.limit):
            granted = asyncio.get_running_loop().create_future()
            self._waiters.append((size, granted))
            try:
                await granted
            except BaseException:  # cancelled (a timeout): give back a grant that came too late
                if granted.done() and not granted.cancelled():
                    self.reserved -= size
                self._wake()
                raise
        else:
            self.reserved += size
        return Lease(self, size)

    def _wake(self) -> None:
        while self._waiters:
            size, granted = self._waiters[0]
            if granted.done():  # its waiter was cancelled
                self._waiters.popleft()
                continue
            if self.reserved + size > self.limit:
                return
            self._waiters.popleft()
            self.reserved += size
            granted.set_result(None)


class Lease:
    """One body's reservation in the byte budget, and the bytes it really holds."""

    def __init__(self, budget: ByteBudget, size: int) -> None:
        self._budget, self.size, self.held = budget, size, 0

    def take(self, n: int) -> None:
        if self.held + n > self.size:  # only when the reservation was clamped to the whole budget
            raise Failure(ErrorKind.TOO_LARGE, f"body exceeds max_bytes_in_flight {self._budget.limit} bytes")
        self.held += n
        self._budget.used += n
        self._budget.peak = max(self._budget.peak, self._budget.used)

    def release(self) -> None:
        if self._budget is None:
            return
        budget, self._budget = self._budget, None
        budget.used -= self.held
        budget.reserved -= self.size
        budget._wake()



async def park(slot: Optional[asyncio.Semaphore], seconds: float) -> None:
    """Sleep without holding the caller's ``slot``; it is held again on return."""
    if slot is None:
        await asyncio.sleep(seconds)
        return
    slot.release()
    try:
        await asyncio.sleep(seconds)
    finally:
        await slot.acquire()

