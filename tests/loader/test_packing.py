"""Packing sequences into fixed-length rows: every token once per epoch over ranks, boundaries,
padding rules, exact mid-epoch resume (in process and with DataLoader workers), batches."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.core import schema
from pipeline.loader import ShardDataset
from pipeline.loader.packing import PackedDataset, PackedLoader
from pipeline.media.npy import npy_bytes
from pipeline.testing.output import write_shards
from pipeline.tokenize.config import SequenceTokenizeConfig
from pipeline.tokenize.sequence import compose, offset_mapping

SEQ_LEN = 16
FIELDS = {"sequence": "sequence.npy", "spans": "spans.npy"}
MAPPING = offset_mapping(SequenceTokenizeConfig(mapping="offset", vocab_size=1000, visual_offset=500, boi=900,
                                                eoi=901, eol=902, bos=1, eos=2))


@pytest.fixture(scope="module")
def sequences(tmp_path_factory):
    """An output directory of 3 shards whose samples hold composed sequences of 3 to ~60 tokens."""
    out = tmp_path_factory.mktemp("packing") / "out"
    rng = np.random.default_rng(7)
    expected, batches = {}, []
    for shard, n in enumerate((9, 14, 6)):
        batch = {c: [None] * n for c in schema.STATUS_COLUMNS}
        batch[schema.FILES] = []
        for i in range(n):
            key = schema.make_key(shard, i, 1000)
            text = rng.integers(3, 500, rng.integers(0, 20))
            grid = rng.integers(0, 400, (rng.integers(1, 4), rng.integers(1, 6)))
            ids, spans = compose([text, grid] if i % 2 else [grid, text], MAPPING)
            expected[key] = (ids, spans)
            batch[schema.KEY][i], batch[schema.STATUS][i] = key, schema.PENDING
            batch[schema.URL][i] = f"http://example.com/{key}.jpg"
            batch[schema.FILES].append({"sequence.npy": npy_bytes(ids.astype(np.uint16)), "spans.npy": npy_bytes(spans)})
        batches.append(batch)
    write_shards(out, batches, "packing-test")
    return out, expected


def packer(out, overflow="split", rank=0, world_size=1, shuffle=True, seq_len=SEQ_LEN, **kw):
    ds = ShardDataset(out, fields=FIELDS, shuffle=shuffle, seed=3, shuffle_buffer=5, rank=rank,
                      world_size=world_size)
    return PackedDataset(ds, seq_len, spans_field="spans", overflow=overflow, **kw)


def signature(rows):
    return [(r["__worker__"], r["tokens"].tolist(), r["__keys__"], r["__offsets__"]) for r in rows]


def pieces(row):
    """(key, offset, tokens, modality) of each piece of a row, from its own boundaries."""
    cu = row["cu_seqlens"].tolist()
    return [(k, o, row["tokens"][a:b].numpy(), row["modality"][a:b].numpy())
            for k, o, a, b in zip(row["__keys__"], row["__offsets__"], cu, cu[1:])]


@pytest.mark.parametrize("overflow", ["split", "pad"])
def test_every_token_is_in_exactly_one_row_over_two_ranks(sequences, overflow):
    out, expected = sequences
    seen: dict[str, list] = {}
    rows_per_rank = []
    for rank in (0, 1):
        rows = list(PackedLoader(packer(out, overflow, rank=rank, world_size=2)))
        rows_per_rank.append(rows)
        for row in rows:
            assert row["tokens"].shape == (SEQ_LEN,)
            for key, offset, tokens, modality in pieces(row):
                seen.setdefault(key, []).append((offset, tokens, modality, rank))
    assert set(seen) == set(expected)
    for key, (ids, spans) in expected.items():
        parts = sorted(seen[key], key=lambda p: p[0])
        assert len({p[3] for p in parts}) == 1  # one rank owns a sample
        assert [p[0] for p in parts] == list(np.cumsum([0] + [len(p[1]) for p in parts[:-1]]))  # no gap, no overlap
        assert np.concatenate([p[1] for p in parts]).tolist() == ids.tolist()
        modality = np.repeat(spans[:, 2], spans[:, 1] - spans[:, 0])
        assert np.concatenate([p[2] for p in parts]).tolist() == modality.tolist()
    total = sum(len(ids) for ids, _ in expected.values())
    padding = sum(int((r["segment_ids"] == 0).sum()) for rows in rows_per_rank for r in rows)
    assert sum(len(rows) for rows in rows_per_rank) * SEQ_LEN == total + padding
    if overflow == "split":  # laid end to end: only each rank's last row is short
        for rows in rows_per_rank:
            assert all(int((r["segment_ids"] == 0).sum()) == 0 for r in rows[:-1])


@pytest.mark.parametrize("overflow", ["split", "pad"])
def test_row_boundaries_describe_the_pieces(sequences, overflow):
    out, expected = sequences
    for row in PackedLoader(packer(out, overflow)):
        cu, seg, pos = row["cu_seqlens"].tolist(), row["segment_ids"].numpy(), row["position_ids"].numpy()
        assert cu[0] == 0 and cu == sorted(cu) and len(cu) == len(row["__keys__"]) + 1
        for j, (a, b) in enumerate(zip(cu, cu[1:])):
            assert (seg[a:b] == j + 1).all() and pos[a:b].tolist() == list(range(b - a))
        assert (seg[cu[-1]:] == 0).all() and (pos[cu[-1]:] == 0).all() and (row["tokens"][cu[-1]:] == 0).all()
        assert (row["modality"][cu[-1]:] == -1).all()
        if overflow == "pad":
            for j, (key, offset) in enumerate(zip(row["__keys__"], row["__offsets__"])):
                length = len(expected[key][0])
                if length <= SEQ_LEN:  # a sample that fits a row is never split
                    assert offset == 0 and cu[j + 1] - cu[j] == length
                elif offset:  # a long one continues only from the start of a row, in seq_len pieces
                    assert j == 0 and offset % SEQ_LEN == 0


def test_a_sample_crossing_a_row_end_continues_in_the_next_row(sequences):
    out, expected = sequences
    rows = list(PackedLoader(packer(out, "split", shuffle=False)))
    continued = [(prev, row) for prev, row in zip(rows, rows[1:]) if row["__offsets__"][0] > 0]
    assert continued
    for prev, row in continued:
        assert prev["__keys__"][-1] == row["__keys__"][0]
        assert row["__offsets__"][0] == prev["__offsets__"][-1] + int(prev["cu_seqlens"][-1] - prev["cu_seqlens"][-2])


def json_copy(state):
    return json.loads(json.dumps(state))  # what a checkpoint keeps


@pytest.mark.parametrize("overflow", ["split", "pad"])
def test_resume_mid_epoch_gives_the_same_rows(sequences, overflow):
    out, _ = sequences
    full = signature(PackedLoader(packer(out, overflow)))
    for stop in (1, 4, 7, len(full) - 1):
        first = PackedLoader(packer(out, overflow))
        head = []
        for row in first:
            head.append(row)
            if len(head) == stop:
                break
        state = json_copy(first.state_dict())
        again = PackedLoader(packer(out, overflow))
        again.load_state_dict(state)
        assert signature(head) + signature(again) == full, stop
        assert again.state_dict()["finished"] == [0]


def test_resume_with_dataloader_workers_keeps_the_order(sequences):
    out, _ = sequences
    full = signature(PackedLoader(packer(out), num_workers=2))
    assert {w for w, *_ in full} == {0, 1}
    first = PackedLoader(packer(out), num_workers=2)
    head = []
    for row in first:
        head.append(row)
        if len(head) == 5:  # worker 0 has delivered one row more than worker 1
            break
    state = json_copy(first.state_dict())
    assert state["next_worker"] == 1
    again = PackedLoader(packer(out), num_workers=2)
    again.load_state_dict(state)
    assert signature(head) + signature(again) == full
    with pytest.raises(ValueError, match="packed with 2 workers; resume it with the same number"):
        resumed = PackedLoader(packer(out), num_workers=0)
        resumed.load_state_dict(state)
        next(iter(resumed))


def test_a_complete_epoch_moves_to_the_next(sequences):
    out, expected = sequences
    loader = PackedLoader(packer(out))
    epoch0 = signature(loader)
    assert loader.stats() == {"epoch": 0, "rows": len(epoch0), "samples": len(expected), "finished_workers": [0]}
    epoch1 = signature(loader)
    assert loader.packed.epoch == 1 and epoch0 != epoch1  # reshuffled
    assert {k for _, _, keys, _ in epoch1 for k in keys} == set(expected)


def test_batches_stack_rows_and_flatten_boundaries(sequences):
    out, _ = sequences
    rows = list(PackedLoader(packer(out)))
    batches = list(PackedLoader(packer(out), batch_size=4))
    assert batches[0]["tokens"].shape == (4, SEQ_LEN)
    assert sum(len(b["__keys__"]) for b in batches) == len(rows)
    b = batches[0]
    cu = b["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == 4 * SEQ_LEN and all(r * SEQ_LEN in cu for r in range(5))
    flat = b["segment_ids"].reshape(-1)
    for a, z in zip(cu, cu[1:]):  # each bound pair is one piece (or one row's padding)
        assert len(set(flat[a:z].tolist())) == 1


def test_bad_setups_are_refused(sequences):
    out, _ = sequences
    with pytest.raises(ValueError, match="the packer takes single samples"):
        PackedDataset(ShardDataset(out, fields=FIELDS, batch_size=4), SEQ_LEN)
    with pytest.raises(ValueError, match="overflow: expected one of"):
        packer(out, overflow="truncate")
    first = PackedLoader(packer(out))
    next(iter(first))
    with pytest.raises(ValueError, match="cannot resume mid-epoch with different packing"):
        PackedLoader(packer(out, seq_len=32)).load_state_dict(json_copy(first.state_dict()))
    with pytest.raises(KeyError, match=r"field 'tokens' is missing; read it with fields="):
        next(iter(PackedLoader(PackedDataset(ShardDataset(out, fields=FIELDS), SEQ_LEN, field="tokens"))))
