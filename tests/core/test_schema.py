"""The sample schema: every error kind belongs to one status; a row's status is set in one way."""
import pickle

import pytest

from pipeline.core import schema
from pipeline.core.schema import ErrorKind


def batch(n=3):
    return {schema.KEY: [f"0000000{i:02d}" for i in range(n)], schema.STATUS: [schema.PENDING] * n,
            schema.ERROR_KIND: [None] * n, schema.ERROR_MESSAGE: [None] * n,
            schema.FILES: [{"jpg": b"x"} for _ in range(n)]}


def test_every_kind_has_a_status_and_a_meaning_and_reads_as_its_name():
    for kind in ErrorKind:
        assert kind.status in schema.STATUSES and kind.status not in (schema.SUCCESS, schema.FILTERED)
        assert kind.meaning and kind == kind.value and f"{kind}" == kind.value
        assert {kind.value: 1}[kind] == 1 and pickle.loads(pickle.dumps(kind)) is kind


def test_mark_fails_a_row_with_its_kind_and_stores_the_plain_name():
    b = batch()
    schema.mark(b, 0, ErrorKind.TIMEOUT, "no answer in 10 s")
    schema.mark(b, 1, "decode_error")
    assert b[schema.STATUS] == [schema.FAILED_TO_DOWNLOAD, schema.FAILED_TO_DECODE, schema.PENDING]
    assert b[schema.ERROR_KIND][:2] == ["timeout", "decode_error"]
    assert type(b[schema.ERROR_KIND][0]) is str  # what the status table and json get
    assert b[schema.ERROR_MESSAGE][:2] == ["no answer in 10 s", ErrorKind.DECODE_ERROR.meaning]
    assert b[schema.FILES][:2] == [{}, {}] and schema.alive(b) == [2]


def test_an_unknown_kind_is_an_error_not_a_filter():
    with pytest.raises(ValueError, match="unknown error kind 'clip_score'.*reject"):
        schema.mark(batch(), 0, "clip_score")


def test_reject_records_the_filter_and_the_stats_count_it_apart():
    b = batch()
    schema.reject(b, 0, "clip_score", "score 0.1 below 0.3")
    schema.mark(b, 1, ErrorKind.HTTP_STATUS, "HTTP 404")
    schema.settle(b)
    assert b[schema.STATUS] == [schema.FILTERED, schema.FAILED_TO_DOWNLOAD, schema.SUCCESS]
    stats = schema.shard_stats(b, 7, {"download": 1.0})
    assert stats["shard"] == "00007" and stats["count"] == 3 and stats["successes"] == 1
    assert stats["error_kinds"] == {"clip_score": 1, "http_status": 1}
    assert stats["filtered"] == {"clip_score": 1} and stats["timings"] == {"download": 1.0}


def test_image_of_finds_any_image_member_and_nothing_else():
    assert schema.image_of({"txt": b"t", "webp": b"W"}) == b"W"
    assert schema.image_of({"mp4": b"V", "json": b"{}"}) is None
    from pipeline.media.resize import ENCODE_FORMATS
    assert set(ENCODE_FORMATS) <= set(schema.IMAGE_EXTENSIONS)  # what we write, we read back
