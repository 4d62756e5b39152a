"""Stream mmcurate output directories into trainers: exact, disjoint and resumable epochs.

    ds = ShardDataset("out/laion", fields={"image": "jpg;png;webp", "text": "txt"},
                      batch_size=256, shuffle=True, seed=0, image_size=224)
    loader = Loader(ds, num_workers=8)        # a torch DataLoader that keeps the resume state
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            ...
        torch.save({"data": loader.state_dict(), ...}, checkpoint)

How an epoch is cut, before a byte is read (index.json gives every shard's sample count):

1. Each source (output directory) is an endless stream of draws: cycle ``c`` visits the source's
   shards in an order seeded by ``(seed, source, cycle)``, each shard's samples in tar order.
   Epoch ``e`` takes the next ``n_i`` draws: the whole source, or its share of a weighted mix.
2. Rank ``r`` takes a contiguous slice of each source's epoch draws; slice sizes differ by at most
   one (or are cut to the same size with ``drop_remainder``).
3. A rank's sources are merged into one stream by a fixed, smooth schedule, and each DataLoader
   worker takes a contiguous range of that stream (whole batches when batching).
4. Within a worker, consecutive windows of ``shuffle_buffer`` draws are permuted, seeded by
   ``(seed, epoch, rank, worker, window)``.

So every draw has exactly one owner ``(rank, worker, step)``: workers read disjoint (shard, sample
range) slices, a rank's epoch length is known up front, and "worker ``w`` has delivered its first
``s`` steps" is a complete resume point. Tar members are found by walking headers; the data of
members that were not asked for is never read when it is larger than a read block (it is seeked
over). A missing or corrupt shard is skipped with a warning and counted (``strict`` raises).

Shards and indexes are untrusted input: a malformed ``index.json``, a count the data cannot hold or
a shard outside the source's directory raises :class:`BadIndexError` when the dataset is built
(``allow_outside_root=True`` lifts the last); a malformed tar raises no further than the shard
(its remaining draws are skipped and counted); a member that does not decode (an image off the
format whitelist or over ``max_pixels``, a bad ``.npy``) skips its sample. See ``index.py``,
``tar.py`` and ``decode.py`` for each rule.

A base read with sidecars (``ShardDataset(base, sidecars=[...])``, see ``sidecar.py``) is zipped by
key: a shard counts the samples every sidecar kept, so all of the above holds for it as well.

``.npy`` fields are read from each shard's column file (``NNNNN.columns.arrow``, memory-mapped; see
``columnar.py``) instead of the tar when every requested field is fixed-shape there (``columnar=None``,
the default; ``True`` also serves ragged fields, as values + offsets + shapes; ``False`` reads the tars):
the same samples in the same order, gathered per batch without per-sample objects.
"""
from pipeline.loader.dataset import Loader, ShardDataset, ShardError, SkippedDataWarning
from pipeline.loader.decode import collate
from pipeline.loader.index import BadIndexError, Shard, Source, open_source, read_index
from pipeline.loader.packing import PackedDataset, PackedLoader, collate_rows
from pipeline.loader.sidecar import SidecarMismatchError, with_sidecars

__all__ = ["ShardDataset", "Loader", "Shard", "Source", "ShardError", "SkippedDataWarning", "BadIndexError",
           "SidecarMismatchError", "read_index", "open_source", "with_sidecars", "collate",
           "PackedDataset", "PackedLoader", "collate_rows"]
