"""Epoch planning, pure arithmetic with no I/O: who reads which draws (sources' draws per epoch,
their split over ranks and workers, the merged order of a rank's sources, shard slices, the
shuffle of a worker's windows), also as arrays of (shard, row) for the columnar reader."""
from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass
from itertools import accumulate, islice
from typing import Iterator, Optional, Sequence

import numpy as np

from pipeline.loader.index import Source


@dataclass(frozen=True)
class Segment:
    """Samples ``start:stop`` (tar order) of shard ``shard`` of source ``source``."""

    source: int
    shard: int
    start: int
    stop: int


def split_evenly(n: int, parts: int, offset: int = 0) -> list[int]:
    """``parts`` sizes summing to ``n``, differing by at most one; the larger ones start at ``offset``."""
    base, extra = divmod(n, parts)
    return [base + (1 if (p - offset) % parts < extra else 0) for p in range(parts)]


def shard_order(nshards: int, seed: int, source: int, cycle: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(nshards))
    return np.random.default_rng([seed, source, cycle, 0x5EED]).permutation(nshards).tolist()


def source_segments(src: Source, index: int, start: int, count: int, seed: int, shuffle: bool) -> list[Segment]:
    """Draws ``start:start+count`` of source ``index``'s endless stream, as shard slices."""
    size, out = src.nsamples, []
    if count <= 0:
        return out
    if size == 0:
        raise ValueError(f"{src.root}: no samples to draw from")
    end = start + count
    for cycle in range(start // size, (end - 1) // size + 1):
        order = shard_order(len(src.shards), seed, index, cycle, shuffle)
        bounds = [0, *accumulate(src.shards[s].nsamples for s in order)]
        lo, hi = max(start - cycle * size, 0), min(end - cycle * size, size)
        k = bisect.bisect_right(bounds, lo) - 1
        while lo < hi:
            a, b = bounds[k], bounds[k + 1]
            if b > lo:
                out.append(Segment(index, order[k], lo - a, min(hi, b) - a))
                lo = min(hi, b)
            k += 1
    return out


def _draw_key(j: int, count: int) -> float:
    # The j-th of `count` draws of a source sits at (j + 1/2) / count of the rank's stream: the
    # merged order is a smooth interleave whose prefix counts need no replay (see mix_prefix).
    return (2 * j + 1) / (2 * count)


def mix_prefix(counts: Sequence[int], t: int) -> list[int]:
    """How many of the first ``t`` draws of the merged stream come from each source.

    The merged order sorts every draw ``(i, j)`` by ``(_draw_key(j, counts[i]), i)``; we estimate
    the prefix and fix it up with exact comparisons, so this is O(sources) however long the stream.
    """
    if len(counts) == 1:
        return [t]
    total = sum(counts)
    x = t / total if total else 0.0
    m = [min(c, max(0, int(x * c + 0.5))) for c in counts]

    def last_in() -> Optional[tuple[float, int]]:
        return max(((_draw_key(m[i] - 1, c), i) for i, c in enumerate(counts) if m[i] > 0), default=None)

    def first_out() -> Optional[tuple[float, int]]:
        return min(((_draw_key(m[i], c), i) for i, c in enumerate(counts) if m[i] < c), default=None)

    while True:  # make m a prefix of the order: no excluded draw before an included one
        hi, lo = last_in(), first_out()
        if hi is None or lo is None or hi < lo:
            break
        m[hi[1]] -= 1
        m[lo[1]] += 1
    while sum(m) < t:
        m[first_out()[1]] += 1
    while sum(m) > t:
        m[last_in()[1]] -= 1
    return m


def mix_order(counts: Sequence[int], start: int, stop: int) -> Iterator[int]:
    """The source index of each draw ``start:stop`` of the merged stream."""
    if len(counts) == 1:
        yield from (0 for _ in range(stop - start))
        return
    m = mix_prefix(counts, start)
    heap = [(_draw_key(m[i], c), i) for i, c in enumerate(counts) if m[i] < c]
    heapq.heapify(heap)
    for _ in range(stop - start):
        _, i = heapq.heappop(heap)
        yield i
        m[i] += 1
        if m[i] < counts[i]:
            heapq.heappush(heap, (_draw_key(m[i], counts[i]), i))


@dataclass(frozen=True)
class Plan:
    """One worker's share of one epoch: draws ``begin:end`` of its rank's merged stream."""

    epoch: int
    rank: int
    worker: int
    counts: tuple[int, ...]      # the rank's draws per source this epoch
    firsts: tuple[int, ...]      # each source's stream position of the rank's first draw
    begin: int
    end: int

    @property
    def steps(self) -> int:
        return self.end - self.begin

    def segments(self, sources: Sequence[Source], seed: int, shuffle: bool, skip: int = 0) -> list[list[Segment]]:
        """Per source, the shard slices of this worker's draws after its first ``skip`` steps."""
        a, b = mix_prefix(self.counts, self.begin + skip), mix_prefix(self.counts, self.end)
        return [source_segments(sources[i], i, self.firsts[i] + a[i], b[i] - a[i], seed, shuffle)
                for i in range(len(sources))]


def epoch_draws(sizes: Sequence[int], weights: Optional[Sequence[float]], epoch_size: Optional[int]) -> list[int]:
    """Draws per source per epoch: each whole source, or (weights) its share of ``epoch_size``."""
    if weights is None:
        if epoch_size is not None:
            raise ValueError("epoch_size needs weights (a mapping of sources to weights)")
        return list(sizes)
    if any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"weights must be >= 0 and not all 0, got {list(weights)}")
    total = sum(sizes) if epoch_size is None else int(epoch_size)
    exact = [w / sum(weights) * total for w in weights]
    draws = [math.floor(x) for x in exact]
    # Largest remainder: the counts sum to exactly `total`.
    for i in sorted(range(len(exact)), key=lambda i: draws[i] - exact[i])[:total - sum(draws)]:
        draws[i] += 1
    return draws


def rank_draws(draws: Sequence[int], world_size: int, drop_remainder: bool) -> list[list[int]]:
    """``[source][rank]`` draw counts; the extra draws rotate over ranks so totals differ by <= 1."""
    out, offset = [], 0
    for n in draws:
        if drop_remainder:
            out.append([n // world_size] * world_size)
        else:
            out.append(split_evenly(n, world_size, offset))
            offset = (offset + n % world_size) % world_size
    return out


def worker_ranges(total: int, num_workers: int, batch_size: Optional[int], drop_last: bool) -> list[tuple[int, int]]:
    """Contiguous ``(begin, end)`` of the rank stream per worker. With batches, workers get whole
    batches, so only the rank's last batch can be short and the batch count is ceil(total / bs)."""
    if batch_size is None:
        sizes = split_evenly(total, num_workers)
    else:
        nbatches = total // batch_size if drop_last else -(-total // batch_size)
        sizes = [b * batch_size for b in split_evenly(nbatches, num_workers)]
        cut = sum(sizes) - (total if not drop_last else nbatches * batch_size)
        for w in reversed(range(num_workers)):  # the short batch is the stream's last one
            if sizes[w]:
                sizes[w] -= cut
                break
    bounds = [0, *accumulate(sizes)]
    return [(bounds[w], bounds[w + 1]) for w in range(num_workers)]


def window_order(seed: int, epoch: int, rank: int, worker: int, window: int, n: int) -> np.ndarray:
    """The permutation of a worker's shuffle window ``window`` (``n`` draws)."""
    return np.random.default_rng([seed, epoch, rank, worker, window, 0xB0F]).permutation(n)


def _segment_arrays(segments: Sequence[Segment], shard_base: Sequence[int], chunk: int
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for seg in segments:
        for lo in range(seg.start, seg.stop, chunk):
            rows = np.arange(lo, min(lo + chunk, seg.stop), dtype=np.int64)
            yield np.full(len(rows), shard_base[seg.source] + seg.shard, np.int64), rows


class _Taker:
    """The next ``n`` draws of one source's stream of (shard, row) arrays."""

    def __init__(self, chunks: Iterator[tuple[np.ndarray, np.ndarray]]) -> None:
        self.chunks, self.shards, self.rows = chunks, np.empty(0, np.int64), np.empty(0, np.int64)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        while len(self.rows) < n:
            shards, rows = next(self.chunks)
            self.shards, self.rows = np.concatenate([self.shards, shards]), np.concatenate([self.rows, rows])
        out = self.shards[:n], self.rows[:n]
        self.shards, self.rows = self.shards[n:], self.rows[n:]
        return out


def draw_arrays(plan: Plan, sources: Sequence[Source], seed: int, shuffle: bool, skip: int = 0,
                chunk: int = 1 << 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The plan's draws from step ``skip`` on, in merged-stream order, as chunks of (flat shard
    index, row) arrays: shard ``k`` of source ``i`` is ``sum(len(s.shards) for s in sources[:i]) + k``."""
    shard_base = [0, *accumulate(len(s.shards) for s in sources)]
    segments = plan.segments(sources, seed, shuffle, skip)
    if len(sources) == 1:
        yield from _segment_arrays(segments[0], shard_base, chunk)
        return
    takers = [_Taker(_segment_arrays(s, shard_base, chunk)) for s in segments]
    order = mix_order(plan.counts, plan.begin + skip, plan.end)
    while True:
        which = np.fromiter(islice(order, chunk), np.int64)
        if not len(which):
            return
        shards, rows = np.empty(len(which), np.int64), np.empty(len(which), np.int64)
        for i, taker in enumerate(takers):
            at = np.flatnonzero(which == i)
            if len(at):
                shards[at], rows[at] = taker.take(len(at))
        yield shards, rows
