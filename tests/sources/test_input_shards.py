import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import schema
from pipeline.job.build import input_shards
from pipeline.job.spec import load_job
from pipeline.sources.formats import iter_records

URLS = [f"http://example.test/{i}.jpg" for i in range(25)]


def spec_for(tmp_path, files, **input_opts):
    data = {"input": {"files": [str(f) for f in files], **input_opts}, "output": {"samples_per_shard": 10}}
    return load_job(data=data)


def test_formats_read_the_same_rows(tmp_path):
    captions = [f"caption {i}, with a comma" for i in range(len(URLS))]
    pq.write_table(pa.table({"url": URLS, "caption": captions}), tmp_path / "a.parquet")
    with open(tmp_path / "a.csv", "w") as f:
        f.write("url,caption\n" + "".join(f'{u},"{c}"\n' for u, c in zip(URLS, captions)))
    with gzip.open(tmp_path / "a.tsv.gz", "wt") as f:
        f.write("url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in zip(URLS, captions)))
    with open(tmp_path / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"url": u, "caption": c}) + "\n" for u, c in zip(URLS, captions))
    for name in ("a.parquet", "a.csv", "a.tsv.gz", "a.jsonl"):
        shards = list(input_shards(spec_for(tmp_path, [tmp_path / name])))
        assert [len(s.batch["key"]) for s in shards] == [10, 10, 5], name
        assert [u for s in shards for u in s.batch["url"]] == URLS, name
        assert [c for s in shards for c in s.batch["caption"]] == captions, name
        assert shards[2].batch["key"][0] == "000020000"
        assert all(st == schema.PENDING for s in shards for st in s.batch["status"])


def test_txt_and_fsspec_url_and_limit(tmp_path):
    (tmp_path / "urls.txt").write_text("\n".join(URLS) + "\n")
    spec = spec_for(tmp_path, [f"file://{tmp_path}/urls.txt"], caption_col=None, limit=12)
    shards = list(input_shards(spec))
    assert [len(s.batch["url"]) for s in shards] == [10, 2]
    assert shards[1].batch["url"] == URLS[10:12]


def test_several_files_and_stable_shards(tmp_path):
    pq.write_table(pa.table({"url": URLS[:13]}), tmp_path / "p1.parquet")
    pq.write_table(pa.table({"url": URLS[13:]}), tmp_path / "p2.parquet")
    spec = spec_for(tmp_path, [tmp_path / "p*.parquet"], caption_col=None)
    first = [s.batch["key"] for s in input_shards(spec)]
    again = [s.batch["key"] for s in input_shards(spec)]
    assert first == again
    assert [u for s in input_shards(spec) for u in s.batch["url"]] == URLS


def test_malformed_rows_become_per_row_failures(tmp_path):
    raw = (b"url,caption\n"
           b"http://ok.test/1.jpg,fine\n"
           b",no url\n"
           b"ftp://files.test/x.jpg,wrong scheme\n"
           b"http://ok.test/2.jpg,bad \xff\xfe utf8\n"
           b"javascript:alert(1),script\n"
           b"https://ok.test/3.jpg,also fine\n")
    (tmp_path / "bad.csv").write_bytes(raw)
    (shard,) = input_shards(spec_for(tmp_path, [tmp_path / "bad.csv"]))
    b = shard.batch
    assert b["status"] == ["pending", "invalid_input", "invalid_input", "invalid_input", "invalid_input", "pending"]
    assert b["error_kind"] == [None, "missing_url", "bad_scheme", "invalid_utf8", "bad_scheme", None]
    assert "\ufffd" in b["caption"][3]  # kept, readable, flagged


def test_bad_json_lines_do_not_stop_the_shard(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(b'{"url": "http://a.test/1.jpg", "caption": "one"}\n'
                                       b'{"url": "http://a.test/2.jpg", "capt\n'
                                       b'[1, 2]\n'
                                       b'{"url": "http://a.test/3.jpg", "caption": "th\xffree"}\n'
                                       b'{"url": "http://a.test/4.jpg"}\n')
    (shard,) = input_shards(spec_for(tmp_path, [tmp_path / "x.jsonl"]))
    assert shard.batch["error_kind"] == [None, "malformed_row", "malformed_row", "invalid_utf8", None]
    assert shard.batch["url"][4] == "http://a.test/4.jpg"


def test_missing_columns_are_clear_errors(tmp_path):
    pq.write_table(pa.table({"URL": URLS}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="input.url_col: column 'url' is not in"):
        list(input_shards(spec_for(tmp_path, [tmp_path / "a.parquet"])))
    pq.write_table(pa.table({"url": URLS}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="set input.caption_col: null"):
        list(input_shards(spec_for(tmp_path, [tmp_path / "b.parquet"])))
    assert len(list(input_shards(spec_for(tmp_path, [tmp_path / "b.parquet"], caption_col=None)))) == 3


def test_iter_records_streams_in_chunks(tmp_path):
    n = 50_000
    pq.write_table(pa.table({"url": [f"http://x.test/{i}" for i in range(n)]}), tmp_path / "big.parquet",
                   row_group_size=5000)
    sizes = [len(c["url"]) for c in iter_records(str(tmp_path / "big.parquet"), batch_rows=4096)]
    assert sum(sizes) == n and max(sizes) <= 4096
    with open(tmp_path / "big.csv", "w") as f:
        f.write("url\n" + "".join(f"http://x.test/{i}\n" for i in range(n)))
    sizes = [len(c["url"]) for c in iter_records(str(tmp_path / "big.csv"), batch_rows=4096)]
    assert sum(sizes) == n and max(sizes) <= 4096
