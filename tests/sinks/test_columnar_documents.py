"""The column file of document shards: a document slot's members (image_NNN.*, text_NNN.*) get no
column, even when every document of the shard has that slot, and are named in ``slot_members``;
the documents' own .npy members are columns as a pair's are."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from pipeline.media.npy import npy_bytes
from pipeline.sinks.columnar import column_file, slot_member


def read(data: bytes) -> pa.Table:
    return pa.ipc.open_file(pa.py_buffer(data)).read_all()


def document_members(n: int, with_sequence: bool) -> list[tuple[str, bytes]]:
    members = []
    for i in range(n):
        key = f"{i:09d}"
        members.append((f"{key}.image_000.jpg", b"jpeg"))
        members.append((f"{key}.image_000.image_ids.npy", npy_bytes(np.full((2, 2), i, np.uint16))))
        members.append((f"{key}.text_000.text_ids.npy", npy_bytes(np.arange(3 + i, dtype=np.uint16))))
        if i % 2:  # a slot only some documents have
            members.append((f"{key}.image_001.image_ids.npy", npy_bytes(np.zeros((2, 2), np.uint16))))
        if with_sequence:
            members.append((f"{key}.sequence.npy", npy_bytes(np.arange(5 + i, dtype=np.uint16))))
        members.append((f"{key}.json", b"{}"))
    return members


def test_slot_members_get_no_column_and_are_listed():
    table = read(column_file(document_members(3, with_sequence=True), tar_bytes=1234))
    assert table.column_names == ["__key__", "sequence.npy", "sequence.npy#shape"]
    meta = table.schema.metadata
    assert json.loads(meta[b"slot_members"]) == ["image_NNN.image_ids.npy", "text_NNN.text_ids.npy"]
    assert json.loads(meta[b"not_columnar"]) == []  # a slot that only some documents have is not "missing"
    assert table.column("__key__").to_pylist() == ["000000000", "000000001", "000000002"]
    assert [len(v) for v in table.column("sequence.npy").to_pylist()] == [5, 6, 7]


def test_documents_with_slot_members_only_have_no_column_file():
    assert column_file(document_members(2, with_sequence=False), tar_bytes=99) is None


def test_slot_member_names_the_slot_pattern():
    assert slot_member("image_003.image_ids.npy") == "image_NNN.image_ids.npy"
    assert slot_member("text_1200.text_ids.npy") == "text_NNN.text_ids.npy"
    assert slot_member("image_ids.npy") is None and slot_member("sequence.npy") is None
    assert slot_member("clip_000.mp4") is None  # a video's clips are not document slots
