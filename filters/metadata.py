"""``metadata``: a rule on a published input column (COYO's ``clip_similarity_vitb32``, DataComp's
``clip_l14_similarity_score``, LAION's ``punsafe``, sizes, a language tag), run before the
download, so the rows it drops are never fetched.

One rule per entry (several entries for several rules)::

    - metadata: {column: clip_l14_similarity_score, top_fraction: 0.3}  # the best 30% of the input
    - metadata: {column: punsafe, max: 0.5}
    - metadata: {column: width, min: 256}
    - metadata: {column: language, values: [en, de]}

``column`` is a column of the input files (a catalog's normalised name such as
``clip_l14_similarity``, or a source column, which the reader then keeps). A row whose value is
missing (null, NaN) is rejected, and so is a non-number under ``min`` / ``max`` /
``top_fraction``. A rejected row gets status ``filtered`` with error kind ``metadata:<column>``,
so stats count each column's rule apart.

``top_fraction`` is exact over the whole input (the first ``input.limit`` rows when set): the
threshold is the k-th highest value, k = ceil(fraction x rows with a number), found in a few passes
over that column alone, in bounded memory (a histogram narrows the range holding the cut, whose
values are then partitioned). Rows equal to the threshold are all kept, so ties can keep slightly
more than the fraction. ``prepare`` stores it in manifest.json, so a resumed job uses the same one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np

from pipeline.core.config import ConfigError
from pipeline.core.stage import JobContext

from .base import Filter, Row, score_problem

BUCKETS = 1 << 16         # histogram buckets per narrowing pass
MAX_HELD = 1 << 20        # values held at once (8 MB of float64) to partition the cut's range


@dataclass
class MetadataConfig:
    column: str = ""
    min: Optional[float] = None
    max: Optional[float] = None
    top_fraction: Optional[float] = None      # keep the rows with the highest values (exact, ties kept)
    values: Optional[list[Any]] = None        # keep rows whose value is one of these

    def validate(self) -> None:
        if not self.column:
            raise ConfigError("column: required: the input column the rule reads")
        rules = [n for n in ("min", "max", "top_fraction", "values") if getattr(self, n) is not None]
        if not rules:
            raise ConfigError("min, max, top_fraction, values: set one rule")
        if len(rules) > 1 and not set(rules) <= {"min", "max"}:
            raise ConfigError(f"{', '.join(rules)}: one rule per entry (min with max is one range); "
                              "add another metadata entry for another rule")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ConfigError(f"top_fraction: must be in (0, 1], got {self.top_fraction}")
        if self.values is not None and not self.values:
            raise ConfigError("values: at least one value to keep")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ConfigError(f"min, max: min {self.min} is above max {self.max}")


def number(value: Any) -> Optional[float]:
    """The value as a float, or None when it is missing (null, NaN) or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) else value


class MetadataFilter(Filter):
    name = "metadata"
    Config = MetadataConfig
    metadata_only = True
    document_view = None  # a rule on the document row itself, before any image is fetched

    def __init__(self, config: MetadataConfig) -> None:
        super().__init__(config)
        self.threshold: Optional[float] = None  # the top_fraction cut, from prepare() or restore()
        self._keep = None if config.values is None else {_hashable(v) for v in config.values}

    @property
    def input_columns(self) -> tuple[str, ...]:
        return (self.config.column,)

    @property
    def kind(self) -> str:
        return f"metadata:{self.config.column}"

    def reject(self, batch, i: int, message: str) -> None:
        from pipeline.core import schema

        schema.reject(batch, i, self.kind, message)

    def problem(self, row: Row) -> Optional[str]:
        o, column = self.config, self.config.column
        raw = row[column]
        if raw is None or (isinstance(raw, float) and math.isnan(raw)):
            return f"{column} is missing"
        if self._keep is not None:
            return None if _hashable(raw) in self._keep else f"{column} {raw!r} is not one of {o.values}"
        value = number(raw)
        if value is None:
            return f"{column} {raw!r} is not a number"
        if o.top_fraction is not None and self.threshold is None:
            raise RuntimeError("metadata: top_fraction needs its threshold: the job runs prepare() or "
                               "restore() before any shard")
        return score_problem(column, value, o.min, o.max, self.threshold, o.top_fraction)

    # -- the top_fraction threshold, once per job ------------------------------------------------
    def prepare(self, context: JobContext) -> Optional[dict[str, Any]]:
        if context.input_columns is None:
            raise RuntimeError("metadata: the job gives no input_columns reader")
        column = self.config.column

        def read() -> Iterator[np.ndarray]:
            for chunk in context.input_columns([column]):
                values = np.array([number(v) for v in chunk[column]], dtype=np.float64)  # None -> NaN
                yield values[~np.isnan(values)]

        if self.config.top_fraction is None:
            for _ in read():  # the reader checks that every input file has the column
                pass
            return None
        threshold, rows = top_threshold(read, self.config.top_fraction)
        if threshold is None:
            raise ConfigError(f"metadata: column {column!r} holds no number in the input, so the "
                              "top_fraction threshold cannot be computed")
        return {"threshold": threshold, "top_fraction": self.config.top_fraction, "rows": rows}

    def restore(self, state: dict[str, Any]) -> None:
        self.threshold = state.get("threshold")


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def top_threshold(read: Callable[[], Iterator[np.ndarray]], fraction: float,
                  buckets: int = BUCKETS, max_held: int = MAX_HELD) -> tuple[Optional[float], int]:
    """The k-th highest value (k = ceil(fraction x count)) of the numbers ``read()`` yields, and
    the count; each call of ``read`` is one pass. At most ``max_held`` values are held: while the
    range holding the cut has more, a histogram of it narrows it to one bucket."""
    lo, hi, top_closed = -math.inf, math.inf, True
    rank: Optional[int] = None  # of the cut, counted from the top, inside [lo, hi)
    total = 0
    edges: Optional[np.ndarray] = None
    while True:
        count, vmin, vmax, held, counts = 0, math.inf, -math.inf, [], None
        if edges is not None:
            counts = np.zeros(buckets, dtype=np.int64)
        for values in read():
            inside = values[(values >= lo) & ((values < hi) | (top_closed & (values == hi)))]
            if not inside.size:
                continue
            count += inside.size
            vmin, vmax = min(vmin, float(inside.min())), max(vmax, float(inside.max()))
            if count <= max_held:
                held.append(inside)
            else:
                held = []
            if counts is not None:
                idx = np.clip(np.searchsorted(edges, inside, side="right") - 1, 0, buckets - 1)
                counts += np.bincount(idx, minlength=buckets)
        if rank is None:  # the first pass: how many numbers there are
            total = count
            if not total:
                return None, 0
            rank = max(1, math.ceil(round(fraction * total, 9)))
        if count <= max_held:
            values = np.concatenate(held)
            return float(np.partition(values, count - rank)[count - rank]), total
        if vmin == vmax:  # all ties
            return vmin, total
        if counts is None:  # the first pass had no range yet: histogram [min, max] next
            lo, hi, top_closed = vmin, vmax, True
            edges = np.linspace(lo, hi, buckets + 1)
            continue
        above = 0
        for j in range(buckets - 1, -1, -1):
            if above + counts[j] >= rank:
                break
            above += int(counts[j])
        rank -= above
        lo, hi, top_closed = float(edges[j]), float(edges[j + 1]), top_closed and j == buckets - 1
        edges = np.linspace(lo, hi, buckets + 1)
