"""Progress bar for a job: shards done, samples/s and success rate; a summary at the end."""
from __future__ import annotations

import sys
import time
from typing import Optional

from tqdm import tqdm

from pipeline.core import schema


class Progress:
    def __init__(self, total_shards: Optional[int], enabled: bool = True) -> None:
        self.start = time.perf_counter()
        self.samples = 0
        self.successes = 0
        self.failed = 0
        self.bar = tqdm(total=total_shards, unit="shard", desc="shards", disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True)

    def _postfix(self) -> None:
        rate = self.samples / max(time.perf_counter() - self.start, 1e-9)
        ok = 100.0 * self.successes / self.samples if self.samples else 0.0
        extra = {"failed shards": self.failed} if self.failed else {}
        self.bar.set_postfix({"samples/s": f"{rate:,.0f}", "success": f"{ok:.1f}%", **extra})

    def skip(self, stats: dict) -> None:
        """A shard complete from an earlier run: counts toward the bar, not toward the rate."""
        self.bar.update(1)

    def done(self, stats: dict) -> None:
        self.samples += stats["count"]
        self.successes += stats["status_counts"].get(schema.SUCCESS, 0)
        self.bar.update(1)
        self._postfix()

    def fail(self) -> None:
        self.failed += 1
        self._postfix()

    def close(self) -> None:
        self.bar.close()
