"""Packing training sequences (``KEY.sequence.npy``) into fixed-length rows, deterministically and
resumably, over a :class:`~pipeline.loader.dataset.ShardDataset` (through its public API only).

    ds = ShardDataset("out/pairs", fields={"sequence": "sequence.npy", "spans": "spans.npy"},
                      shuffle=True, seed=0)          # no batch_size: the packer takes samples
    loader = PackedLoader(PackedDataset(ds, seq_len=4096), num_workers=4, batch_size=8)
    for batch in loader:                             # (8, 4096) tokens, segment_ids, position_ids
        ...
    torch.save({"data": loader.state_dict(), ...}, checkpoint)

Each DataLoader worker packs its own draws (the dataset's exact, disjoint split over ranks and
workers), in their order, so the rows are a function of the dataset's setup, ``num_workers``,
``seq_len`` and ``overflow``. Two ways to fill a row:

* ``overflow="split"`` (default): the samples' tokens are laid end to end; a sample that crosses
  the end of a row continues at the start of the next one (so does one longer than ``seq_len``,
  over as many rows as it needs). No padding except each worker's last row of the epoch.
* ``overflow="pad"``: a sample that does not fit in the rest of a row starts the next row (the rest
  is padding); only a sample longer than ``seq_len`` is split, into ``seq_len`` pieces from the
  start of a row, its last piece shared with the samples after it.

Either way every token of the epoch is in exactly one row. An interleaved document is one sample
(its ``sequence.npy`` holds the whole document, ``pipeline.tokenize.sequence``), so the pieces below
are documents: ``segment_ids`` / ``cu_seqlens`` are document boundaries, and the images inside a
document are runs of ``modality`` 1, not boundaries (a split may cut an image between two rows). A row holds ``tokens`` (int64),
``segment_ids`` (1, 2, ... per piece of a sample in the row, 0 on padding), ``position_ids`` (from 0
in each piece, as its attention sees it; 0 on padding), ``cu_seqlens`` (int32, the pieces' bounds:
``[0, l1, l1+l2, ...]``, for varlen attention; padding lies after the last bound), ``modality``
(int8 per token from the spans, -1 on padding; when ``spans_field`` is given) and ``__keys__`` /
``__offsets__`` (each piece's sample key and where in the sample it starts).

Resume: after each row the packer knows, for its worker, the step of the next sample to pack and
how many of its tokens are in rows already. :class:`PackedLoader` records that per worker in the
dataset's own state (the samples before it are delivered) plus the offset, and delivers the
workers' rows in a fixed round-robin that its state also keeps, so a run resumed from
``state_dict()`` yields the same rows, in the same order, as one that was not stopped.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.loader.dataset import ShardDataset

STATE_VERSION = 1
OVERFLOWS = ("split", "pad")


def _field(sample: Mapping, name: str) -> np.ndarray:
    """A sample's field as an array; the errors name the sample and the field."""
    what = f"sample {sample['__key__']} in {sample.get('__url__')}: field {name!r}"
    if name not in sample:
        raise KeyError(f"{what} is missing; read it with fields={{{name!r}: '{name}.npy', ...}}")
    value = sample[name]
    if isinstance(value, torch.Tensor):
        value = value.numpy()
    if isinstance(value, (bytes, bytearray)):
        raise ValueError(f"{what}: got bytes; read the dataset with decode=True (the default)")
    return np.asarray(value)


class _Row:
    """One row being filled."""

    def __init__(self, seq_len: int, pad_id: int, modality: bool):
        self.tokens = np.full(seq_len, pad_id, np.int64)
        self.segments = np.zeros(seq_len, np.int32)
        self.positions = np.zeros(seq_len, np.int64)
        self.modality = np.full(seq_len, -1, np.int8) if modality else None
        self.bounds, self.keys, self.offsets, self.completed = [0], [], [], []
        self.fill = 0
        self.resume: tuple[int, int] = (0, 0)

    def put(self, key: str, offset: int, ids: np.ndarray, modality: Optional[np.ndarray], last: bool) -> None:
        a, b = self.fill, self.fill + len(ids)
        self.tokens[a:b] = ids
        self.segments[a:b] = len(self.keys) + 1
        self.positions[a:b] = np.arange(len(ids))
        if self.modality is not None:
            self.modality[a:b] = modality
        self.keys.append(key)
        self.offsets.append(offset)
        self.bounds.append(b)
        if last:
            self.completed.append(key)
        self.fill = b

    def close(self, worker: int, index: int, resume: tuple[int, int]) -> dict:
        row = {"tokens": torch.from_numpy(self.tokens), "segment_ids": torch.from_numpy(self.segments),
               "position_ids": torch.from_numpy(self.positions),
               "cu_seqlens": torch.tensor(self.bounds, dtype=torch.int32),
               "__keys__": self.keys, "__offsets__": self.offsets, "__completed__": self.completed,
               "__worker__": worker, "__row__": index, "__resume__": resume}
        if self.modality is not None:
            row["modality"] = torch.from_numpy(self.modality)
        return row


class PackedDataset(IterableDataset):
    """Rows of ``seq_len`` tokens from the ``field`` of ``dataset``'s samples (see the module
    docstring). ``dataset`` yields single samples (no ``batch_size``). Iterate it through
    :class:`PackedLoader`, which orders and records the rows and drops the workers' end markers."""

    def __init__(self, dataset: ShardDataset, seq_len: int, *, field: str = "sequence",
                 spans_field: Optional[str] = None, overflow: str = "split", pad_id: int = 0):
        if not isinstance(dataset, ShardDataset):
            raise ValueError(f"dataset: expected a ShardDataset, got {type(dataset).__name__}")
        if dataset.batch_size is not None:
            raise ValueError(f"dataset: the packer takes single samples; build it without batch_size "
                             f"(got {dataset.batch_size}) and give PackedLoader a batch_size of rows")
        if seq_len <= 0:
            raise ValueError(f"seq_len: must be > 0, got {seq_len}")
        if overflow not in OVERFLOWS:
            raise ValueError(f"overflow: expected one of {OVERFLOWS}, got {overflow!r}")
        self.dataset, self.seq_len, self.field, self.spans_field = dataset, int(seq_len), field, spans_field
        self.overflow, self.pad_id = overflow, int(pad_id)
        self._reset()

    def _reset(self) -> None:
        self._offsets: dict[int, int] = {}   # worker -> tokens of its next sample already in rows
        self._rows: dict[int, int] = {}      # worker -> rows delivered this epoch
        self._finished: set[int] = set()     # workers whose epoch is fully delivered
        self._next_worker = 0                # whose row comes next in the round-robin
        self._num_workers: Optional[int] = None

    # -- state -------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.dataset.epoch:
            self.dataset.set_epoch(epoch)
            self._reset()

    def _config(self) -> dict:
        return {"seq_len": self.seq_len, "field": self.field, "spans_field": self.spans_field,
                "overflow": self.overflow, "pad_id": self.pad_id}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "dataset": self.dataset.state_dict(), "num_workers": self._num_workers,
                "offsets": {str(w): o for w, o in sorted(self._offsets.items())},
                "rows": {str(w): n for w, n in sorted(self._rows.items())}, "finished": sorted(self._finished),
                "next_worker": self._next_worker, "config": self._config()}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported packing state version {state.get('version')!r}")
        started = bool(state["rows"])
        if started and state["config"] != self._config():
            diff = {k: (v, self._config().get(k)) for k, v in state["config"].items() if self._config().get(k) != v}
            raise ValueError(f"cannot resume mid-epoch with different packing (saved, now): {diff}")
        self.dataset.load_state_dict(state["dataset"])
        self._reset()
        self._offsets = {int(w): int(o) for w, o in state["offsets"].items()}
        self._rows = {int(w): int(n) for w, n in state["rows"].items()}
        self._finished = {int(w) for w in state["finished"]}
        self._next_worker = int(state["next_worker"])
        self._num_workers = state["num_workers"] if started else None

    def begin(self, num_workers: int) -> None:
        """Before a pass: the worker count must match the progress; a complete epoch moves on."""
        if self._rows and self._num_workers not in (None, num_workers):
            raise ValueError(f"this epoch was packed with {self._num_workers} workers; resume it with the same "
                             f"number (got {num_workers}), or start the next epoch with set_epoch")
        self._num_workers = num_workers
        if len(self._finished) >= num_workers:
            self.set_epoch(self.epoch + 1)
            self._num_workers = num_workers

    def record(self, row: Mapping) -> None:
        """Note that ``row`` was delivered (PackedLoader calls this in order)."""
        worker = row["__worker__"]
        if row.get("__end__"):
            self._finished.add(worker)
            return
        step, offset = row["__resume__"]
        if step > 0:  # the samples before ``step`` are in delivered rows
            self.dataset.record({"__worker__": worker, "__step__": step - 1, "__key__": list(row["__completed__"])})
        self._offsets[worker] = offset
        self._rows[worker] = self._rows.get(worker, 0) + 1

    def deliver(self, items: Iterator[dict], num_workers: int) -> Iterator[dict]:
        """The rows of ``items`` (the workers' streams in any interleaving, with their end markers)
        in a fixed round-robin over the workers from the recorded one, a finished worker skipped;
        each is recorded as it is handed over."""
        queues: dict[int, list[dict]] = {w: [] for w in range(num_workers)}
        done = set(self._finished)
        while len(done) < num_workers:
            w = self._next_worker
            if w in done:
                self._next_worker = (w + 1) % num_workers
                continue
            while not queues[w]:  # rows arrive in the DataLoader's order; they leave in ours
                item = next(items, None)
                if item is None:
                    raise RuntimeError(f"worker {w} ended without its end marker")
                if item["__worker__"] not in done:  # a finished worker only sends its end marker again
                    queues[item["__worker__"]].append(item)
            row = queues[w].pop(0)
            self.record(row)
            if row.get("__end__"):
                done.add(w)
                continue
            self._next_worker = (w + 1) % num_workers
            yield row

    def stats(self) -> dict:
        return {"epoch": self.epoch, "rows": sum(self._rows.values()),
                "samples": self.dataset.stats()["delivered"], "finished_workers": sorted(self._finished)}

    # -- packing -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.worker_rows(worker, num_workers)

    def worker_rows(self, worker: int, num_workers: int) -> Iterator[dict]:
        """Worker ``worker``'s rows from its recorded position, then an end marker
        ``{"__worker__": worker, "__end__": True}``."""
        resume_step = self.dataset.state_dict()["consumed"].get(str(worker), 0)
        skip = self._offsets.get(worker, 0)
        index = self._rows.get(worker, 0)
        row, step = self._new_row(), resume_step - 1
        for sample in self.dataset.iter_worker(worker, num_workers):
            step = sample["__step__"]
            ids = _field(sample, self.field)
            if ids.ndim != 1:
                raise ValueError(f"sample {sample['__key__']}: {self.field} has shape {ids.shape}; expected 1-D ids")
            start = skip if step == resume_step else 0  # its first tokens are in rows delivered before
            closed, row = self._pack(row, sample["__key__"], step, ids, self._modality(sample, len(ids)), start)
            for done in closed:
                yield done.close(worker, index, done.resume)
                index += 1
        if row.fill:
            yield row.close(worker, index, (step + 1, 0))
        yield {"__worker__": worker, "__end__": True}

    def _new_row(self) -> _Row:
        return _Row(self.seq_len, self.pad_id, self.spans_field is not None)

    def _pack(self, row: _Row, key: str, step: int, ids: np.ndarray, modality: Optional[np.ndarray],
              pos: int) -> tuple[list[_Row], _Row]:
        """Place one sample from token ``pos`` on: the rows it closed (each with where to resume
        after it: the step and token offset of the next token to pack) and the open row."""
        closed, n = [], len(ids)
        while pos < n:
            room, rest = self.seq_len - row.fill, n - pos
            if self.overflow == "pad" and row.fill and rest > room:
                row.resume = (step, pos)  # it does not fit: the rest of the row is padding
                closed.append(row)
                row = self._new_row()
                continue
            take = min(room, rest)
            row.put(key, pos, ids[pos:pos + take], None if modality is None else modality[pos:pos + take],
                    pos + take == n)
            pos += take
            if row.fill == self.seq_len:
                row.resume = (step, pos) if pos < n else (step + 1, 0)
                closed.append(row)
                row = self._new_row()
        return closed, row

    def _modality(self, sample: Mapping, n: int) -> Optional[np.ndarray]:
        if self.spans_field is None:
            return None
        spans = _field(sample, self.spans_field)
        if spans.ndim != 2 or spans.shape[1] != 3 or (len(spans) and (spans[0, 0] != 0 or spans[-1, 1] != n)):
            raise ValueError(f"sample {sample['__key__']}: {self.spans_field} does not tile its {n} tokens")
        return np.repeat(spans[:, 2], spans[:, 1] - spans[:, 0]).astype(np.int8)


def collate_rows(rows: list[dict]) -> dict:
    """Rows stacked (``tokens`` etc. as (B, seq_len)); ``cu_seqlens`` over the flattened batch, each
    row's padding as a piece of its own, so ``(B * seq_len)`` tokens go to varlen attention as is."""
    out = {k: torch.stack([r[k] for r in rows]) for k in ("tokens", "segment_ids", "position_ids", "modality")
           if k in rows[0]}
    bounds, base = [0], 0
    for r in rows:
        cu = r["cu_seqlens"].tolist()
        bounds.extend(base + b for b in cu[1:])
        if cu[-1] < len(r["tokens"]):
            bounds.append(base + len(r["tokens"]))
        base += len(r["tokens"])
    out["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32)
    for k in ("__keys__", "__offsets__", "__worker__", "__row__"):
        out[k] = [r[k] for r in rows]
    return out


def _as_is(item: Any) -> Any:
    return item


class PackedLoader:
    """Rows of a :class:`PackedDataset` from ``num_workers`` DataLoader workers, in a fixed
    round-robin over the workers (a finished worker is skipped), recorded as they are delivered
    so that ``state_dict()`` taken between rows (or batches) resumes exactly. ``batch_size``
    stacks rows with :func:`collate_rows`. Extra keyword arguments go to the DataLoader."""

    def __init__(self, packed: PackedDataset, num_workers: int = 0, batch_size: Optional[int] = None,
                 **dataloader_kwargs: Any):
        if dataloader_kwargs.get("persistent_workers"):
            raise ValueError("persistent workers would keep a stale resume state; they are not supported")
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size: must be > 0, got {batch_size}")
        self.packed, self.num_workers, self.batch_size, self.kwargs = packed, num_workers, batch_size, dataloader_kwargs

    def __iter__(self) -> Iterator[dict]:
        if self.batch_size is None:
            yield from self._rows()
            return
        pending = []
        for row in self._rows():
            pending.append(row)
            if len(pending) == self.batch_size:
                yield collate_rows(pending)
                pending = []
        if pending:
            yield collate_rows(pending)

    def _rows(self) -> Iterator[dict]:
        packed, workers = self.packed, max(1, self.num_workers)
        packed.begin(workers)
        if self.num_workers:
            items = iter(DataLoader(packed, batch_size=None, num_workers=self.num_workers,
                                    **{"collate_fn": _as_is, **self.kwargs}))
        else:
            items = packed.worker_rows(0, 1)
        yield from packed.deliver(items, workers)

    def stats(self) -> dict:
        """This epoch's progress on this rank: rows delivered, samples whose last token was in them."""
        return self.packed.stats()

    def set_epoch(self, epoch: int) -> None:
        self.packed.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.packed.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.packed.load_state_dict(state)
