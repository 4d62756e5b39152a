"""Jobs over existing shards (``input.shards``, ``mmcurate subset``): download once from the local
server, close it, then filter again and reshard from the tars alone."""
from __future__ import annotations

import tarfile

import pyarrow.parquet as pq
import pytest

from pipeline.cli.main import main
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.loader.dataset import ShardDataset
from tests.helpers.jobs import image_server, job_file


def samples(out_dir) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} over every tar of a directory."""
    out: dict[str, dict[str, bytes]] = {}
    for path in sorted(out_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    with image_server() as server:
        path = job_file(tmp, server, rows=40)
        result = run_job(load_job(path))
    assert result.ok and result.status_counts["success"] > 20
    return tmp / "job"  # the server is closed from here on: nothing below can reach it


def by_caption(out) -> dict[str, bytes]:
    return {s["txt"].decode(): s["jpg"] for s in samples(out).values()}


def test_refilter_and_reshard_without_network(downloaded, tmp_path):
    source = by_caption(downloaded)
    data = {"input": {"shards": [str(downloaded)]}, "filters": [{"caption": {"max_chars": 16}}],
            "output": {"dir": str(tmp_path / "small"), "samples_per_shard": 3},
            "execution": {"engine": "local", "progress": False}}
    result = run_job(load_job(data=data))
    assert result.ok
    kept = by_caption(tmp_path / "small")
    assert kept == {c: b for c, b in source.items() if len(c) <= 16}  # media bytes unchanged, each once
    assert result.status_counts["filtered"] == len(source) - len(kept)
    table = pq.read_table(tmp_path / "small" / "00000.parquet").to_pydict()
    assert table["url"][0].startswith("http://127.0.0.1")  # columns of the source's status table
    assert all(k for k in table["source_key"]) and all(s.endswith(".tar") for s in table["source_shard"])
    assert len(list((tmp_path / "small").glob("*.tar"))) == -(-len(source) // 3)


def test_subset_command_reshards_every_sample_once(downloaded, tmp_path, capsys):
    out = tmp_path / "resharded"
    assert main(["subset", str(downloaded), str(out), "--samples-per-shard", "5", "--no-progress"]) == 0
    source, new = samples(downloaded), samples(out)
    assert sorted(s["jpg"] for s in new.values()) == sorted(s["jpg"] for s in source.values())
    assert sorted(s["txt"] for s in new.values()) == sorted(s["txt"] for s in source.values())
    assert all(len(tarfile.open(p).getmembers()) <= 5 * 3 for p in out.glob("*.tar"))  # jpg, txt, json
    read = {s["__key__"]: s["jpg"] for s in ShardDataset(str(out), fields=["jpg"], decode=False)}
    assert read == {k: s["jpg"] for k, s in new.items()}  # the loader reads the new dataset back
    assert "samples kept" in capsys.readouterr().out


def test_subset_on_ray_writes_what_local_writes(downloaded, tmp_path):
    """The same subset on the Ray engine (a private Ray): every output file byte-identical."""
    args = ["--samples-per-shard", "7", "--filter", "caption: {max_chars: 16}", "--no-progress"]
    assert main(["subset", str(downloaded), str(tmp_path / "local"), "--engine", "local", *args]) == 0
    assert main(["subset", str(downloaded), str(tmp_path / "ray"), "--engine", "ray", *args]) == 0
    names = sorted(p.name for p in (tmp_path / "local").iterdir() if p.name[0].isdigit())
    assert names and names == sorted(p.name for p in (tmp_path / "ray").iterdir() if p.name[0].isdigit())
    for name in names:
        if not name.endswith("_stats.json"):  # stats carry timings
            assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name


def test_subset_help_explains(capsys):
    with pytest.raises(SystemExit):
        main(["subset", "--help"])
    text = capsys.readouterr().out
    assert "without touching the network" in text and "--samples-per-shard" in text and "--filter" in text


def test_img2dataset_output_through_the_tiny_clip(tmp_path):
    """img2dataset's layout (NNNNN.tar of KEY.jpg/.txt/.json, NNNNN.parquet, NNNNN_stats.json)
    scored by clip_score from the tars alone; its parquet's fields come along as columns."""
    import io
    import json

    import pyarrow as pa
    from PIL import Image

    from pipeline.sinks.webdataset import tar_bytes
    from pipeline.testing.assets import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS

    src = tmp_path / "i2d"
    src.mkdir()
    keys = [f"{i:09d}" for i in range(6)]
    rows = {"url": [f"http://e.com/{i}.jpg" for i in range(6)], "caption": [f"a red square {i}" for i in range(6)],
            "key": keys, "status": ["success"] * 5 + ["failed_to_download"],
            "error_message": [None] * 5 + ["timeout"], "width": [64] * 5 + [None], "height": [64] * 5 + [None],
            "original_width": [128] * 5 + [None], "original_height": [128] * 5 + [None],
            "exif": ["{}"] * 5 + [None], "sha256": [f"{i:064x}" for i in range(5)] + [None]}
    pq.write_table(pa.table(rows), src / "00000.parquet")
    members = []
    for i in range(5):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (40 * i, 200, 30)).save(buf, "JPEG")
        members += [(f"{keys[i]}.jpg", buf.getvalue()), (f"{keys[i]}.txt", rows["caption"][i].encode()),
                    (f"{keys[i]}.json", json.dumps({c: rows[c][i] for c in rows}).encode())]
    (src / "00000.tar").write_bytes(tar_bytes(members))
    (src / "00000_stats.json").write_text(json.dumps({"count": 6, "successes": 5, "failed_to_download": 1}))
    clip = {"model": str(TINY_CLIP_CONFIG), "pretrained": str(TINY_CLIP_WEIGHTS), "batch_size": 8, "device": "cpu"}
    data = {"input": {"shards": [str(src)]}, "filters": [{"clip_score": clip}],
            "output": {"dir": str(tmp_path / "scored"), "samples_per_shard": 4},
            "execution": {"engine": "local", "progress": False}}
    result = run_job(load_job(data=data))
    assert result.ok and result.samples == 5  # the failed row of img2dataset's table is no input
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "scored").glob("0*.parquet"))]).to_pydict()
    assert sorted(table["source_key"]) == keys[:5] and table["exif"] == ["{}"] * 5
    assert table["original_width"] == [128] * 5 and all(isinstance(s, float) for s in table["clip_score"])
