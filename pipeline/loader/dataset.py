"""The trainer-facing dataset and loader: :class:`ShardDataset` (sources, fields, ranks, epochs,
shuffling and resume state) and :class:`Loader`, the torch DataLoader that keeps that state."""
from __future__ import annotations

import contextlib
import os
import warnings
from itertools import chain
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.loader.columnar import ColumnReader, FieldLayout, columnar_fields
from pipeline.loader.decode import ImageOptions, _decode_column, _decode_value, collate
from pipeline.loader.index import Shard, Source, _open, open_source
from pipeline.loader.plan import (Plan, Segment, epoch_draws, mix_order, rank_draws, window_order,
                                 worker_ranges)
from pipeline.loader.sidecar import SidecarMismatchError, with_sidecars, zipped_samples
from pipeline.loader.tar import READ_BLOCK, SCAN_BLOCK, TarFormatError, _samples, _TarReader
from pipeline.media.geometry import MAX_PIXELS

STATE_VERSION = 1


class ShardError(RuntimeError):
    """A shard is missing, unreadable or corrupt (raised in strict mode)."""


class SkippedDataWarning(UserWarning):
    """A shard or sample was skipped because it is missing or corrupt (non-strict mode)."""


# -- the dataset -----------------------------------------------------------------------------------

SourcesArg = Union[str, os.PathLike, Source, Sequence[Union[str, os.PathLike, Source]],
                   Mapping[Union[str, os.PathLike], float]]


def _parse_fields(fields: Union[None, str, Sequence[str], Mapping[str, str]]) -> Optional[dict[str, str]]:
    """Member extension -> output field. ``"jpg;png"`` means either extension, as one field."""
    if fields is None:
        return None
    if isinstance(fields, str):
        fields = fields.split(",")
    pairs = fields.items() if isinstance(fields, Mapping) else ((f, f) for f in fields)
    want: dict[str, str] = {}
    for name, spec in pairs:
        for ext in str(spec).split(";"):
            ext = ext.strip()
            if not ext or ext in want:
                raise ValueError(f"field {name!r}: empty or repeated extension {ext!r}")
            want[ext] = name.split(";")[0].strip()
    return want


def _resolve_rank(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is None and world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if rank is None or world_size is None:
        raise ValueError("give both rank and world_size, or neither")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return rank, world_size


class ShardDataset(IterableDataset):
    """A torch ``IterableDataset`` over one or more mmcurate output directories.

    * ``sources``: a directory (path or fsspec URL), a list of them (each read whole every epoch),
      or a mapping ``{dir: weight}`` (weights are shares of each epoch's ``epoch_size`` draws,
      default the total size; a source is repeated or sub-sampled to match, and a sub-sampled
      source continues where the previous epoch stopped, so all of it is seen over epochs).
    * ``fields``: member extensions to read, e.g. ``["jpg", "txt"]`` or
      ``{"image": "jpg;png;webp", "tokens": "text_ids.npy"}``; None reads every member. Only the
      listed members' bytes are read; a sample lacking one of them is skipped and counted.
    * ``decode``: images to CHW tensors (``image_dtype`` uint8 or float32, optional
      ``image_size`` / ``resize_mode`` as in the job spec), ``.npy`` to tensors, ``.txt`` to str,
      ``.json`` to objects, anything else stays bytes. ``decoders`` overrides per field. False
      leaves every field as bytes. Member bytes are untrusted: images are opened with the download
      path's format whitelist and ``max_pixels`` cap (default the download default), read from the
      header before any pixel is decoded; a refused or undecodable member skips its sample.
    * ``batch_size``: yield collated batches (same-shape tensors stacked, else lists); workers
      get whole batches so a rank has ceil(samples / batch_size) batches (floor with drop_last).
    * ``rank`` / ``world_size``: default from torch.distributed, else the RANK / WORLD_SIZE
      environment, else 0 / 1. ``drop_remainder`` gives every rank the same number of samples.
    * ``shuffle``: shard order per (seed, cycle) and a window of ``shuffle_buffer`` samples per
      (seed, epoch, rank, worker, window).
    * ``strict``: raise :class:`ShardError` instead of skipping a missing or corrupt shard/sample.
    * ``allow_outside_root``: read shards that ``index.json`` places outside the source's directory
      (``..``, absolute paths, symlinks out, other URLs); by default such an index is refused with
      :class:`~pipeline.loader.index.BadIndexError`, as is one with malformed or impossible counts.
    * ``sidecars``: directories written with ``output.layout: sidecar`` over the one base directory
      ``sources``, zipped with it by key (``pipeline.loader.sidecar``): a sample is kept when every
      sidecar has it as a success, and its members are the base's plus the sidecars'. A sidecar that
      does not match its base raises :class:`~pipeline.loader.sidecar.SidecarMismatchError`. To mix
      such a base with other sources, pass ``with_sidecars(base, [...])`` as one of them.
    * ``columnar``: gather batches of ``.npy`` fields from the shards' column files
      (``pipeline.loader.columnar``: same samples, order and values; ragged fields as ``values`` +
      ``offsets`` + ``shapes``). None (default): when every shard has them and every field has one
      shape, so batches are what the tars give (see ``columnar_refused`` for why not); True: also
      ragged fields, and raise ValueError unless it can; False: always read the tars.

    Every sample carries ``__key__``, ``__url__``, ``__worker__`` and ``__step__``. Resume state is
    kept when the dataset is iterated in this process or through :class:`Loader`; with a plain
    torch DataLoader and workers, call :meth:`set_epoch` every epoch (as with DistributedSampler).
    """

    def __init__(self, sources: SourcesArg, *, fields: Union[None, str, Sequence[str], Mapping[str, str]] = None,
                 batch_size: Optional[int] = None, drop_last: bool = False, shuffle: bool = False, seed: int = 0,
                 shuffle_buffer: int = 1000, rank: Optional[int] = None, world_size: Optional[int] = None,
                 drop_remainder: bool = False, epoch_size: Optional[int] = None, decode: bool = True,
                 image_dtype: str = "uint8", image_size: Optional[int] = None, resize_mode: str = "center_crop",
                 decoders: Optional[Mapping[str, Callable[[bytes], Any]]] = None, strict: bool = False,
                 storage_options: Optional[dict] = None, max_pixels: int = MAX_PIXELS,
                 allow_outside_root: bool = False, sidecars: Sequence[Union[str, os.PathLike]] = (),
                 columnar: Optional[bool] = None):
        if batch_size is not None and batch_size <= 0:
            raise ValueError("batch_size must be > 0")
        if shuffle_buffer <= 0:
            raise ValueError("shuffle_buffer must be > 0")
        roots, weights = self._split_sources(sources)
        if sidecars:
            if len(roots) != 1 or weights is not None or isinstance(roots[0], Source):
                raise ValueError("sidecars: zip with one base directory; to mix it with other sources, pass "
                                 "pipeline.loader.with_sidecars(base, sidecars) as one of them")
            roots = [with_sidecars(os.fspath(roots[0]), [os.fspath(s) for s in sidecars], storage_options,
                                   allow_outside_root)]
        self.image = ImageOptions(image_dtype, image_size, resize_mode, max_pixels)  # checked before any I/O
        self.sources = [open_source(r, storage_options, allow_outside_root) for r in roots]
        self.weights = weights
        self.epoch_size = epoch_size
        self.draws = epoch_draws([s.nsamples for s in self.sources], weights, epoch_size)
        for src, n in zip(self.sources, self.draws):
            if n and not src.nsamples:
                raise ValueError(f"{src.root}: weighted source has no samples")
        self.want = _parse_fields(fields)
        self._nfields = len(set(self.want.values())) if self.want else 0
        self.batch_size, self.drop_last = batch_size, drop_last
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, int(seed), shuffle_buffer
        self.rank, self.world_size = _resolve_rank(rank, world_size)
        self.drop_remainder = drop_remainder
        self.decode = decode
        self.decoders = dict(decoders or {})
        self.strict = strict
        self.storage_options = storage_options
        # Field layouts when batches are gathered from the shards' column files; else why not.
        layouts = columnar_fields(self.sources, self.want, batch_size, decode, self.decoders, storage_options,
                                  ragged=bool(columnar)) if columnar is not False else "columnar=False"
        if columnar and isinstance(layouts, str):
            raise ValueError(f"columnar=True, but these shards cannot be read from column files: {layouts}")
        self.columnar: Optional[dict[str, FieldLayout]] = layouts if isinstance(layouts, dict) else None
        self.columnar_refused: Optional[str] = layouts if isinstance(layouts, str) else None
        self.epoch = 0
        self._consumed: dict[int, int] = {}   # worker -> steps delivered this epoch
        self._num_workers: Optional[int] = None  # the worker count the consumed steps refer to
        self._delivered = 0

    @staticmethod
    def _split_sources(sources: SourcesArg) -> tuple[list, Optional[list[float]]]:
        if isinstance(sources, Mapping):
            return list(sources), [float(w) for w in sources.values()]
        if isinstance(sources, (str, os.PathLike, Source)):
            return [sources], None
        return list(sources), None

    # -- sizes -------------------------------------------------------------------------------------
    def rank_counts(self) -> list[int]:
        """This rank's draws per source in every epoch."""
        return [c[self.rank] for c in rank_draws(self.draws, self.world_size, self.drop_remainder)]

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (before any skipped as corrupt)."""
        total = sum(self.rank_counts())
        if self.batch_size is not None and self.drop_last:
            return total // self.batch_size * self.batch_size
        return total

    @property
    def num_batches(self) -> Optional[int]:
        if self.batch_size is None:
            return None
        total = sum(self.rank_counts())
        return total // self.batch_size if self.drop_last else -(-total // self.batch_size)

    def __len__(self) -> int:
        return self.num_samples if self.batch_size is None else self.num_batches

    def plan(self, worker: int = 0, num_workers: int = 1, epoch: Optional[int] = None) -> Plan:
        """The draws of ``worker`` (of ``num_workers``) on this rank in ``epoch``."""
        epoch = self.epoch if epoch is None else epoch
        per_rank = rank_draws(self.draws, self.world_size, self.drop_remainder)
        counts = tuple(c[self.rank] for c in per_rank)
        firsts = tuple(epoch * n + sum(c[:self.rank]) for n, c in zip(self.draws, per_rank))
        begin, end = worker_ranges(sum(counts), num_workers, self.batch_size, self.drop_last)[worker]
        return Plan(epoch, self.rank, worker, counts, firsts, begin, end)

    # -- epochs and resume state -------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; progress is kept when it is the current one (resume)."""
        if epoch != self.epoch:
            self.epoch, self._consumed, self._delivered = int(epoch), {}, 0

    def _config(self) -> dict:
        return {"sizes": [s.nsamples for s in self.sources], "draws": self.draws, "seed": self.seed,
                "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer, "batch_size": self.batch_size,
                "drop_last": self.drop_last, "drop_remainder": self.drop_remainder,
                "rank": self.rank, "world_size": self.world_size}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "num_workers": self._num_workers,
                "consumed": {str(w): s for w, s in sorted(self._consumed.items())},
                "delivered": self._delivered, "config": self._config()}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported loader state version {state.get('version')!r}")
        consumed = {int(w): int(s) for w, s in state["consumed"].items()}
        if consumed and state["config"] != self._config():
            diff = {k: (v, self._config().get(k)) for k, v in state["config"].items() if self._config().get(k) != v}
            raise ValueError(f"cannot resume mid-epoch with a different dataset or setup (saved, now): {diff}")
        self.epoch, self._consumed = int(state["epoch"]), consumed
        self._num_workers = state["num_workers"] if consumed else None
        self._delivered = int(state.get("delivered", 0))

    def _begin(self, num_workers: int) -> None:
        """Before a pass: check the worker count matches the progress, and move to the next epoch
        when this one is complete (so a loop without set_epoch still sees fresh epochs)."""
        if self._consumed and self._num_workers not in (None, num_workers):  # None: recorded by hand
            raise ValueError(f"this epoch was started with {self._num_workers} workers; resume it with the "
                             f"same number (got {num_workers}), or start the next epoch with set_epoch")
        self._num_workers = num_workers
        if self._consumed and all(self._consumed.get(w, 0) >= self.plan(w, num_workers).steps
                                  for w in range(num_workers)):
            self.set_epoch(self.epoch + 1)

    def record(self, item: Mapping) -> None:
        """Note that a sample or batch from this dataset was delivered (the Loader calls this)."""
        workers, steps = item["__worker__"], item["__step__"]
        if isinstance(workers, int):
            workers, steps = [workers], [steps]
        workers, steps = _ints(workers), _ints(steps)
        if workers and workers.count(workers[0]) == len(workers):  # a batch is one worker's: no walk
            workers, steps = workers[:1], [max(steps)]
        for w, s in zip(workers, steps):
            if s + 1 > self._consumed.get(w, 0):
                self._consumed[int(w)] = int(s) + 1
        self._delivered += len(item["__key__"]) if isinstance(item["__key__"], list) else 1

    def stats(self) -> dict:
        """Progress of the current epoch on this rank, as recorded in this process."""
        return {"epoch": self.epoch, "expected": self.num_samples, "delivered": self._delivered}

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        self._begin(num_workers)
        for item in self.iter_worker(worker, num_workers):
            if info is None:  # iterated in this process: the progress is ours to keep
                self.record(item)
            yield item

    def iter_worker(self, worker: int, num_workers: int) -> Iterator[dict]:
        """What DataLoader worker ``worker`` of ``num_workers`` yields, iterated here (for custom
        process pools, debugging and tests); it resumes from, but does not record, progress."""
        return self._batches(worker, num_workers) if self.batch_size else self._samples(worker, num_workers)

    def _samples(self, worker: int, num_workers: int) -> Iterator[dict]:
        for step, raw in self._raw(worker, num_workers):
            sample = self._decode_one(raw) if raw is not None else None
            if sample is not None:
                sample["__worker__"], sample["__step__"] = worker, step
                yield sample

    def _batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        """Batches of ``batch_size`` consecutive steps (worker ranges are whole batches); samples
        skipped as corrupt leave their batch short rather than shift every later batch."""
        if self.columnar:
            yield from ColumnReader(self, self.columnar).batches(worker, num_workers)
            return
        pending: list[tuple[int, tuple]] = []
        steps, size = self.plan(worker, num_workers).steps, self.batch_size
        for step, raw in self._raw(worker, num_workers):
            if raw is not None:
                pending.append((step, raw))
            if (step + 1) % size == 0 or step + 1 == steps:
                batch = self._decode_batch(pending, worker) if pending else None
                pending = []
                if batch is not None:
                    yield batch

    def _raw(self, worker: int, num_workers: int) -> Iterator[tuple[int, Optional[tuple]]]:
        """``(step, raw sample or None)`` for this worker's undelivered steps, shuffled."""
        plan = self.plan(worker, num_workers)
        first = self._consumed.get(worker, 0)
        if first >= plan.steps:
            return
        if not self.shuffle:
            yield from enumerate(self._draws(plan, first), start=first)
            return
        window = self.shuffle_buffer
        w0 = first // window
        stream = self._draws(plan, w0 * window)
        for w in range(w0, -(-plan.steps // window)):
            items = [next(stream) for _ in range(min(window, plan.steps - w * window))]
            order = self._window_order(w, worker, len(items))
            for k in range(first - w * window if w == w0 else 0, len(items)):
                yield w * window + k, items[order[k]]

    def _window_order(self, window: int, worker: int, n: int) -> list[int]:
        return window_order(self.seed, self.epoch, self.rank, worker, window, n).tolist()

    def _draws(self, plan: Plan, skip: int) -> Iterator[Optional[tuple]]:
        """The raw samples of the plan's draws from step ``skip`` on, in merged-stream order."""
        segments = plan.segments(self.sources, self.seed, self.shuffle, skip)
        readers = [chain.from_iterable(map(self._read_shard, s)) for s in segments]
        if len(readers) == 1:
            yield from readers[0]
            return
        for i in mix_order(plan.counts, plan.begin + skip, plan.end):
            yield next(readers[i])

    def _read_shard(self, seg: Segment) -> Iterator[Optional[tuple]]:
        """Exactly ``seg.stop - seg.start`` items: ``(key, url, files)``, or None where a sample
        is missing or corrupt (so every later draw keeps its step)."""
        shard = self.sources[seg.source].shards[seg.shard]
        done, wanted = 0, seg.stop - seg.start
        last = seg.stop == shard.nsamples  # read on past the count: a tar holding more is reported
        try:
            with contextlib.closing(self._shard_samples(shard, seg.start, None if last else seg.stop)) as samples:
                for key, files in samples:
                    if done == wanted:
                        self._problem(f"shard {shard.url}: has more samples than index.json says "
                                      f"({shard.nsamples}); the rest are not read")
                        break
                    done += 1
                    yield self._check_fields(key, shard.url, files)
            if done < wanted:
                raise TarFormatError(f"has fewer samples than index.json says ({shard.nsamples})")
        except SidecarMismatchError:
            raise  # the wrong data, not damaged data: never skipped
        except (OSError, TarFormatError, ValueError) as e:
            skipped = f"skipping samples {seg.start + done}..{seg.stop - 1}" if done < wanted else \
                "after the samples index.json counts"
            self._problem(f"shard {shard.url}: {type(e).__name__}: {e}; {skipped}", e)
            yield from (None for _ in range(wanted - done))

    def _shard_samples(self, shard: Shard, start: int, stop: Optional[int]) -> Iterator[tuple[str, dict]]:
        """``(key, files)`` of the shard's samples ``start:stop`` (a zipped shard's: the kept ones)."""
        fast = _small_samples(shard)
        if shard.zipped is not None:
            yield from zipped_samples(shard, start, stop, self.want, self.storage_options, fast)
            return
        with _open(shard.url, self.storage_options) as f:
            yield from _samples(_TarReader(f, SCAN_BLOCK if fast else READ_BLOCK), start, stop, self.want, fast)

    def _check_fields(self, key: str, url: str, files: dict) -> Optional[tuple]:
        if self.want is not None and len(files) != self._nfields:
            missing = set(self.want.values()) - set(files)
            if missing:
                self._problem(f"sample {key} in {url} lacks {sorted(missing)}; skipping it")
                return None
        return key, url, files

    def _problem(self, message: str, cause: Optional[BaseException] = None) -> None:
        if self.strict:
            raise ShardError(message) from cause
        warnings.warn(message, SkippedDataWarning, stacklevel=2)

    def _decode_field(self, field: str, ext: str, data: bytes) -> Any:
        if field in self.decoders:
            return self.decoders[field](data)
        return _decode_value(ext, data, self.image) if self.decode else data

    def _decode_one(self, raw: tuple) -> Optional[dict]:
        key, url, files = raw
        try:
            sample = {f: self._decode_field(f, ext, data) for f, (ext, data) in files.items()}
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad sample, not a crash
            why = getattr(e, "kind", None) or type(e).__name__  # ImageRejected carries its ErrorKind
            self._problem(f"sample {key} in {url}: cannot decode: {why}: {e}; skipping it", e)
            return None
        sample["__key__"], sample["__url__"] = key, url
        return sample

    def _decode_batch(self, pending: list[tuple[int, tuple]], worker: int) -> Optional[dict]:
        fields = pending[0][1][2].keys()
        same_fields = self.want is not None or all(raw[2].keys() == fields for _, raw in pending)  # checked on read
        if self.decode and not self.decoders and same_fields:
            try:  # column-wise: one copy for fixed-shape arrays, one stack for images
                batch = {f: _decode_column([raw[2][f][0] for _, raw in pending], [raw[2][f][1] for _, raw in pending],
                                           self.image) for f in fields}
            except Exception:  # noqa: BLE001 - find the bad sample(s) one by one below
                batch = None
            if batch is not None:
                batch["__key__"] = [raw[0] for _, raw in pending]
                batch["__url__"] = [raw[1] for _, raw in pending]
                batch["__worker__"] = [worker] * len(pending)
                batch["__step__"] = [step for step, _ in pending]
                return batch
        samples = []
        for step, raw in pending:
            sample = self._decode_one(raw)
            if sample is not None:
                sample["__worker__"], sample["__step__"] = worker, step
                samples.append(sample)
        return collate(samples) if samples else None


def _small_samples(shard: Shard) -> bool:
    """Samples small enough that reading whole blocks costs less than walking headers in Python."""
    return bool(shard.filesize and shard.nsamples and shard.filesize / shard.nsamples <= READ_BLOCK // 16)


def _ints(values: Any) -> list[int]:
    if isinstance(values, torch.Tensor):
        return values.tolist()
    return values if isinstance(values, list) else [int(v) for v in values]  # our batches hold lists


# -- loader ----------------------------------------------------------------------------------------

def _as_is(item: Any) -> Any:
    return item


class Loader:
    """A torch DataLoader over a :class:`ShardDataset` that records what it delivered, so that
    ``state_dict()`` taken between batches resumes without repeating or skipping a sample.

    Extra keyword arguments go to ``torch.utils.data.DataLoader`` (pin_memory, prefetch_factor,
    multiprocessing_context, ...). Workers are not persistent: each pass starts them afresh
    from the recorded state. Without ``batch_size`` on the dataset, this yields single samples.
    """

    def __init__(self, dataset: ShardDataset, num_workers: int = 0, **dataloader_kwargs: Any):
        if dataloader_kwargs.get("persistent_workers"):
            raise ValueError("persistent workers would keep a stale resume state; they are not supported")
        self.dataset = dataset
        self.num_workers = num_workers
        self.kwargs = dataloader_kwargs

    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        ds._begin(max(1, self.num_workers))
        kwargs = {"collate_fn": _as_is, **self.kwargs}  # items are tensors already: skip default_convert's walk
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, **kwargs)
        for item in loader:
            if self.num_workers:  # in-process iteration records by itself
                ds.record(item)
            yield item
        missing = ds.num_samples - ds.stats()["delivered"]  # reached only when the pass is complete
        if missing > 0:
            self._warn_missing(missing)

    def _warn_missing(self, missing: int) -> None:
        warnings.warn(f"epoch {self.dataset.epoch}: {missing} of {self.dataset.num_samples} samples on rank "
                      f"{self.dataset.rank} were skipped as missing or corrupt", SkippedDataWarning, stacklevel=3)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.dataset.load_state_dict(state)

    def stats(self) -> dict:
        """The dataset's stats plus ``missing``: samples skipped as missing or corrupt, once a pass
        is complete (before that, also the samples still to come)."""
        stats = self.dataset.stats()
        return dict(stats, missing=stats["expected"] - stats["delivered"])
