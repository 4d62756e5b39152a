"""Every hostile case through a whole job: each row ends in its documented status and error kind,
and the good images are in the tar at the promised size."""
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from helpers.hostile_server import hostile_server
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job


@pytest.fixture(scope="module")
def hostile_job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    with hostile_server() as (server, cases):
        image_cases = {n: c for n, c in cases.items() if c.media != "video"}
        names = sorted(image_cases)
        pq.write_table(pa.table({"url": [image_cases[n].url for n in names], "caption": names}),
                       tmp / "urls.parquet")
        spec = load_job(data={
            "input": {"files": [str(tmp / "urls.parquet")]},
            "download": {"image_size": 32, "timeout": 1.5, "retries": 0, "max_bytes": 8_000_000,
                         "allowed_networks": ["127.0.0.0/8"], "concurrency": 64},
            "output": {"dir": str(tmp / "out"), "samples_per_shard": 20},
            "execution": {"engine": "local", "progress": False}})
        result = run_job(spec)
        sent = dict(server.state.sent)
    table = pa.concat_tables(pq.read_table(p) for p in sorted((tmp / "out").glob("*.parquet"))).to_pydict()
    rows = {caption: {k: table[k][i] for k in table} for i, caption in enumerate(table["caption"])}
    return result, image_cases, rows, tmp / "out", sent


def test_every_case_ends_in_its_documented_status(hostile_job):
    result, cases, rows, _, _ = hostile_job
    assert result.ok
    wrong = {name: (rows[name]["status"], rows[name]["error_kind"], case.status, case.error_kind)
             for name, case in cases.items()
             if (rows[name]["status"], rows[name]["error_kind"]) != (case.status, case.error_kind)}
    assert not wrong, wrong
    for name, case in cases.items():
        if case.status != "success":
            assert rows[name]["error_message"], name


def test_good_images_are_in_the_tars_at_the_promised_size(hostile_job):
    _, cases, rows, out, _ = hostile_job
    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False))
    by_caption = {s["txt"].decode(): s for s in samples}
    expected = {n for n, c in cases.items() if c.status == "success"}
    assert set(by_caption) == expected
    for name in expected:
        img = Image.open(io.BytesIO(by_caption[name]["jpg"]))
        assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB", name
        assert rows[name]["original_width"] and rows[name]["sha256"], name
    assert (rows["ok_exif_rotated"]["original_width"], rows["ok_exif_rotated"]["original_height"]) == (32, 64)


def test_a_shard_with_failures_keeps_all_its_rows(hostile_job):
    _, cases, rows, out, _ = hostile_job
    assert len(rows) == len(cases)
    assert all(r["key"].isdigit() and len(r["key"]) == 9 for r in rows.values())
