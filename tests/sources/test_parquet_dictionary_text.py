"""Valid UTF-8 in a binary parquet column is text (issue 12, finding 12), dictionary-encoded
columns included, which pyarrow gives back as written (a pandas categorical of
bytes, an Arrow dictionary array)."""
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.job.build import input_shards
from pipeline.job.spec import load_job

U = "http://example.test/{}.jpg".format


def rows_of(path):
    spec = load_job(data={"input": {"files": [str(path)]}, "output": {"samples_per_shard": 100}})
    return [(b["url"][i], b["caption"][i], b["error_kind"][i]) for s in input_shards(spec) for b in [s.batch]
            for i in range(len(b["key"]))]


def test_dictionary_encoded_binary_columns_are_text_where_valid_utf8(tmp_path):
    urls = pa.array([U(1).encode(), b"http://example.test/\xff.jpg", U(1).encode(), None], pa.binary())
    captions = pa.array(["caf\u00e9".encode(), b"x", b"bad \xfe", b"y"], pa.large_binary())
    path = tmp_path / "dict.parquet"
    pq.write_table(pa.table({"url": urls.dictionary_encode(), "caption": captions.dictionary_encode()}), path)
    assert pa.types.is_dictionary(pq.read_table(path).schema.field("url").type)  # read back as written
    rows = rows_of(path)
    assert rows[0] == (U(1), "caf\u00e9", None)
    assert [r[2] for r in rows[1:]] == ["invalid_utf8", "invalid_utf8", "missing_url"]
    assert rows[2][0] == U(1) and "\ufffd" in rows[1][0]


def test_dictionary_encoded_string_columns_still_read(tmp_path):
    path = tmp_path / "cat.parquet"
    pq.write_table(pa.table({"url": pa.array([U(1), U(2), U(1)]).dictionary_encode(),
                             "caption": pa.array(["one", "two", "one"]).dictionary_encode()}), path)
    assert rows_of(path) == [(U(1), "one", None), (U(2), "two", None), (U(1), "one", None)]
