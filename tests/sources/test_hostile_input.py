"""Hostile input files and rows: every input row gets a status row, a bad row fails alone (its
neighbours are read, fetched and written), and a file that cannot be read at all is one clear
InputFileError naming it, never a raw traceback from deep inside a reader."""
import datetime
import gzip
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers.jobs import job_file
from pipeline.job.build import input_rows, input_shards
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.sources.formats import MAX_FIELD_CHARS, MAX_JSON_DEPTH, InputFileError, count_rows, iter_records

U = "http://example.test/{}.jpg".format


def spec_for(files, **input_opts):
    data = {"input": {"files": [str(f) for f in files], **input_opts}, "output": {"samples_per_shard": 100}}
    return load_job(data=data)


def rows_of(files, **input_opts):
    """``[(url, caption, error_kind, error_message)]`` of every input row, in order."""
    batches = [s.batch for s in input_shards(spec_for(files, **input_opts))]
    return [(b["url"][i], b["caption"][i], b["error_kind"][i], b["error_message"][i])
            for b in batches for i in range(len(b["key"]))]


def jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def run_job_over(tmp_path, server, files, extras=()):
    """Run a real job (helpers.jobs.job_file: the image server, 8 rows per shard) over ``files``;
    its status rows in input order, and every tar member by name."""
    path = job_file(tmp_path, server, input__files=[str(f) for f in files],
                    input__save_additional_columns=list(extras))
    result = run_job(load_job(path))
    assert result.ok, result.failed_shards
    rows = [r for p in sorted((tmp_path / "job").glob("0*.parquet")) for r in pq.read_table(p).to_pylist()]
    members = {}
    for tar in sorted((tmp_path / "job").glob("*.tar")):
        with tarfile.open(tar) as t:
            members.update({m.name: t.extractfile(m).read() for m in t.getmembers()})
    return rows, members


OK = ("success", None)


# -- 1. values of the wrong type, through a real job ---------------------------------------------
def test_captions_urls_and_columns_of_any_type_get_a_status_row_each(tmp_path, server):
    url = [server.url(f"{i}.jpg") for i in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16)]
    deep = 0
    for _ in range(MAX_JSON_DEPTH - 1):
        deep = [deep]
    mixed = jsonl(tmp_path / "mixed.jsonl", [
        {"url": url[0], "caption": "plain text", "meta": {"a": ["undecodable here"]}},
        {"url": url[1], "caption": 7},
        {"url": url[2], "caption": 2.5},
        {"url": url[3], "caption": True},
        '{"url": "%s", "caption": NaN}' % url[4],
        {"url": url[5], "caption": ["two", "captions"]},
        {"url": url[6], "caption": {"en": "an object"}},
        {"url": 12345, "caption": "a number for a URL"},
        {"url": [url[7]], "caption": "a list for a URL"},
        {"url": url[8], "caption": None, "meta": deep},        # as deep as allowed: written
        {"url": url[9], "caption": "after them all", "meta": {}},  # Parquet has no empty struct
        {"url": url[10], "meta": 2 ** 70},                     # beyond int64
    ])
    mixed.write_bytes(mixed.read_bytes().replace(b"undecodable here", b"undecodable \xff"))
    typed = tmp_path / "typed.parquet"
    pq.write_table(pa.table({
        "url": pa.array([url[11].encode(), url[12].encode()], pa.binary()),  # valid UTF-8 bytes
        "caption": pa.array([41, 42], pa.int64()),
        "meta": pa.array([datetime.datetime(2020, 1, 2, 3, 4, 5), None], pa.timestamp("us")),
    }), typed)
    rows, members = run_job_over(tmp_path, server, [mixed, typed], extras=["meta"])
    assert len(rows) == 14  # one status row per input row
    assert [(r["status"], r["error_kind"]) for r in rows] == [
        OK, OK, OK, OK, OK, ("invalid_input", "malformed_row"), ("invalid_input", "malformed_row"),
        ("invalid_input", "bad_url"), ("invalid_input", "bad_url"), OK, OK, OK, OK, OK]
    assert "'caption'" in rows[5]["error_message"] and "list" in rows[5]["error_message"]
    assert "'url'" in rows[7]["error_message"] and "int" in rows[7]["error_message"]
    assert [r["caption"] for r in rows[:5]] == ["plain text", "7", "2.5", "True", None]
    assert rows[7]["url"] == "12345" and rows[6]["caption"] == '{"en": "an object"}'  # shown as text
    assert rows[12]["url"] == url[11] and rows[12]["caption"] == "41"
    assert rows[0]["meta"] == {"a": ["undecodable \ufffd"]}
    keys = [r["key"] for r in rows]
    texts = [members[f"{keys[i]}.txt"].decode() for i in (0, 1, 2, 3, 4, 10, 12)]
    assert texts == ["plain text", "7", "2.5", "True", "", "after them all", "41"]
    meta = {i: json.loads(members[f"{keys[i]}.json"])["meta"] for i in (9, 10, 11, 12)}
    assert meta == {9: deep, 10: None, 11: str(2 ** 70), 12: "2020-01-02T03:04:05"}
    assert f"{keys[5]}.jpg" not in members


def test_rows_that_cannot_be_parsed_fail_alone_through_a_real_job(tmp_path, server):
    url = [server.url(f"{i}.jpg") for i in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12)]
    lines = jsonl(tmp_path / "lines.jsonl", [
        {"url": url[0], "caption": "zero"},
        '{"url": "%s", "caption": "\\ud800"}' % url[1],
        '{"url": "%s", "caption": %s1%s}' % (url[2], "[" * 50_000, "]" * 50_000),
        '{"url": "%s", "caption": 1%s}' % (url[3], "0" * 5000),  # more digits than Python converts
        {"url": url[4], "caption": "four"},
    ])
    table = tmp_path / "table.csv"
    table.write_text(f'url,caption\n{url[5]},five\n{url[6]},"never closed\n{url[7]},seven\n'
                     f'{url[8]},{"x" * (MAX_FIELD_CHARS + 1)}\n{url[9]},"nine, quoted"\n')
    rows, members = run_job_over(tmp_path, server, [lines, table])
    bad = ("invalid_input", "malformed_row")
    assert [(r["status"], r["error_kind"]) for r in rows] == [OK, bad, bad, bad, OK, OK, bad, OK, bad, OK]
    assert [r["caption"] for i, r in enumerate(rows) if rows[i]["status"] == "success"] == [
        "zero", "four", "five", "seven", "nine, quoted"]
    assert sum(name.endswith(".jpg") for name in members) == 5


# -- 2, 3. JSONL: lone surrogates and deep nesting -----------------------------------------------
def test_jsonl_lone_surrogates_and_deep_nesting_fail_their_row_only(tmp_path):
    path = jsonl(tmp_path / "x.jsonl", [
        {"url": U(1), "caption": "one"},
        '{"url": "%s", "caption": "\\ud800"}' % U(2),                  # lone high surrogate
        '{"url": "%s", "caption": "ok", "extra": ["\\udfff"]}' % U(3),  # nested, in a column not read
        '{"\\ud800": 1, "url": "%s"}' % U(4),                          # in a key
        '{"url": "%s", "caption": %s1%s}' % (U(5), "[" * 100_000, "]" * 100_000),  # RecursionError
        '{"url": "%s", "caption": %s1%s}' % (U(6), "[" * (MAX_JSON_DEPTH + 1), "]" * (MAX_JSON_DEPTH + 1)),
        '{"url": "%s", "caption": "\\ud83d\\ude00 a real pair"}' % U(7),  # a surrogate pair is text
        {"url": U(8), "caption": "last"},
    ])
    rows = rows_of([path])
    assert [r[2] for r in rows] == [None, "malformed_row", "malformed_row", "malformed_row", "malformed_row",
                                    "malformed_row", None, None]
    assert "line 2" in rows[1][3] and "'caption'" in rows[1][3] and "surrogate" in rows[1][3]
    assert "'extra'" in rows[2][3]
    assert "line 5" in rows[4][3] and "deeper" in rows[4][3]
    assert "line 6" in rows[5][3] and f"deeper than {MAX_JSON_DEPTH}" in rows[5][3]
    assert rows[6][:2] == (U(7), "\U0001F600 a real pair")
    assert rows[7][:2] == (U(8), "last")


# -- 4. CSV/TSV fields beyond the csv module's default limit -------------------------------------
@pytest.mark.parametrize("fmt,sep", [("csv", ","), ("tsv", "\t")])
def test_long_fields_are_read_and_too_long_ones_fail_their_row(tmp_path, fmt, sep):
    long, too_long = "x" * 200_000, "y" * (MAX_FIELD_CHARS + 1)
    path = tmp_path / f"long.{fmt}"
    path.write_text(f"url{sep}caption\n{U(1)}{sep}{long}\n{U(2)}{sep}{too_long}\n{U(3)}{sep}three\n")
    rows = rows_of([path])
    assert rows[0][:3] == (U(1), long, None)
    assert rows[1][2] == "malformed_row" and "line 3" in rows[1][3] and str(MAX_FIELD_CHARS) in rows[1][3]
    assert rows[2][:3] == (U(3), "three", None)


# -- 5. binary parquet columns -------------------------------------------------------------------
def test_binary_parquet_columns_are_text_where_valid_utf8(tmp_path):
    path = tmp_path / "bin.parquet"
    pq.write_table(pa.table({"url": pa.array([U(1).encode(), b"http://example.test/\xff.jpg", None, U(4).encode()],
                                             pa.binary()),
                             "caption": pa.array(["caf\u00e9".encode(), b"x", b"y", b"bad \xfe"],
                                                 pa.large_binary())}), path)
    rows = rows_of([path])
    assert rows[0][:3] == (U(1), "caf\u00e9", None)
    assert [r[2] for r in rows[1:]] == ["invalid_utf8", "missing_url", "invalid_utf8"]
    assert "\ufffd" in rows[1][0]


def test_invalid_utf8_in_a_parquet_string_column_fails_its_row_only(tmp_path):
    # writers that skip validation leave such bytes in string columns; pyarrow raises on them
    urls = pa.array([U(1).encode(), b"http://example.test/\xff.jpg", U(3).encode()], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"url": urls, "caption": ["one", "two", "three"]}), tmp_path / "s.parquet")
    rows = rows_of([tmp_path / "s.parquet"])
    assert [r[:3] for r in rows] == [(U(1), "one", None), ("http://example.test/\ufffd.jpg", "two", "invalid_utf8"),
                                     (U(3), "three", None)]


# -- 6. byte-order marks -------------------------------------------------------------------------
def test_a_leading_byte_order_mark_is_dropped(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.txt").write_bytes(bom + f"{U(1)}\n{U(2)}\n".encode())
    (tmp_path / "a.csv").write_bytes(bom + f"url,caption\n{U(1)},one\n".encode())
    (tmp_path / "a.tsv").write_bytes(bom + f"url\tcaption\n{U(1)}\tone\n".encode())
    (tmp_path / "a.jsonl").write_bytes(bom + json.dumps({"url": U(1), "caption": "one"}).encode() + b"\n")
    (tmp_path / "a.csv.gz").write_bytes(gzip.compress(bom + f"url,caption\n{U(1)},one\n".encode()))
    assert rows_of([tmp_path / "a.txt"], caption_col=None) == [(U(1), None, None, None), (U(2), None, None, None)]
    for name in ("a.csv", "a.tsv", "a.jsonl", "a.csv.gz"):
        assert rows_of([tmp_path / name]) == [(U(1), "one", None, None)], name


# -- 7. an unclosed CSV quote --------------------------------------------------------------------
def test_an_unclosed_quote_is_a_bad_row_and_the_lines_it_swallowed_are_read_again(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text(f'url,caption\n{U(1)},one\n{U(2)},"never closed\n{U(3)},three\n{U(4)},"four, quoted"\n'
                    f'{U(5)},"a legal\nmulti-line caption"\n{U(6)},six\n{U(7)},"stray" text after a quote\n{U(8)},8\n')
    rows = rows_of([path])
    assert [r[0] for r in rows] == [U(1), None, U(3), U(4), U(5), U(6), None, U(8)]
    assert rows[1][2] == "malformed_row" and "line 3" in rows[1][3] and "lines 4-5" in rows[1][3]
    assert [r[1] for r in rows[2:6]] == ["three", "four, quoted", "a legal\nmulti-line caption", "six"]
    assert rows[6][2] == "malformed_row" and "line 9" in rows[6][3] and "read again" not in rows[6][3]
    assert [r[2] for r in rows] == [None, "malformed_row", None, None, None, None, "malformed_row", None]


def test_an_unclosed_quote_to_the_end_of_the_file_loses_no_row(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text(f'url,caption\n{U(1)},"open to the end\n' + "".join(f"{U(i)},row {i}\n" for i in range(2, 6)))
    rows = rows_of([path])
    assert [r[2] for r in rows] == ["malformed_row", None, None, None, None]
    assert [r[1] for r in rows[1:]] == [f"row {i}" for i in range(2, 6)]
    assert "line 2" in rows[0][3] and "lines 3-6" in rows[0][3]


# -- 8. files that cannot be read ----------------------------------------------------------------
def broken_files(tmp_path):
    text = "url,caption\n" + "".join(f"{U(i)},caption {i}\n" for i in range(2000))
    (tmp_path / "cut.csv.gz").write_bytes(gzip.compress(text.encode())[:500])
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(text.encode())[:500])
    (tmp_path / "notgzip.txt.gz").write_bytes(b"plain text, no gzip header\n")
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "html.parquet").write_bytes(b"<html><body>404 not found</body></html>" * 10)
    good = io.BytesIO()
    pq.write_table(pa.table({"url": [U(i) for i in range(100)]}), good)
    (tmp_path / "cut.parquet").write_bytes(good.getvalue()[:-100])
    return ["cut.csv.gz", "cut.jsonl.gz", "notgzip.txt.gz", "empty.parquet", "html.parquet", "cut.parquet",
            "vanished.csv", "vanished.parquet"]


def test_unreadable_files_raise_an_input_file_error_naming_them(tmp_path):
    for name in broken_files(tmp_path):
        path = str(tmp_path / name)
        with pytest.raises(InputFileError, match=name) as caught:
            list(iter_records(path))
        assert isinstance(caught.value, ValueError) and caught.value.path == path
        with pytest.raises(InputFileError, match=name):
            list(input_shards(spec_for([path], caption_col=None)))
        if name.endswith(".parquet"):
            with pytest.raises(InputFileError, match=name):
                count_rows([path])
            with pytest.raises(InputFileError, match=name):
                input_rows(spec_for([path], caption_col=None))
    with pytest.raises(InputFileError, match=r"truncated.*after \d+ rows"):
        list(iter_records(str(tmp_path / "cut.csv.gz")))
    with pytest.raises(InputFileError, match="no such file"):
        list(iter_records(str(tmp_path / "vanished.csv")))
