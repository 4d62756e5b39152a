"""Filters inside real jobs: a server on 127.0.0.1, the tiny CLIP with a top_fraction rule, exact
and near dedup across shards, per-filter counts in the stats, exact resume, and the report."""
import io
import json
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline.cli.report import write_report
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.testing import synthetic
from pipeline.testing.assets import TINY_CLIP
from pipeline.testing.serve import LocalServer

torch.set_num_threads(2)

MODEL_DIR = TINY_CLIP
N = 48
FILTERS = [
    {"caption": {"min_words": 3}},
    {"dedup_exact": {}},
    {"clip_score": {"model": str(MODEL_DIR / "tiny-clip.json"), "pretrained": str(MODEL_DIR / "tiny-clip.safetensors"),
                    "top_fraction": 0.6, "sample_size": 20, "batch_size": 16, "store_embeddings": True}},
    {"dedup_near": {"method": "phash", "max_distance": 4}},
]
FILTER_NAMES = {name for entry in FILTERS for name in entry}


def rows():
    """48 URLs: every 4th caption belongs to another image, every 12th image repeats an earlier
    one byte for byte (so across shards of 16), every 10th caption is too short."""
    pairs = synthetic.make_pairs(N, seed=99, size=96)
    wrong = synthetic.shuffled_captions([c for _, c in pairs], seed=99)
    files, out = {}, []
    for i, (image, caption) in enumerate(pairs):
        source = i - 11 if i % 12 == 11 else i
        files[f"{i}.jpg"] = synthetic.encode(pairs[source][0], "jpg", 90)
        if i % 4 == 2:
            caption = wrong[i]
        if i % 10 == 9:
            caption = "shape"
        out.append((f"{i}.jpg", caption))
    return files, out


@pytest.fixture(scope="module")
def server():
    files, _ = rows()
    with LocalServer(files, content_type="image/jpeg") as srv:
        yield srv


def job_spec(tmp_path, server, name="filtered", **execution):
    urls = tmp_path / "urls.parquet"
    _, table = rows()
    if not urls.exists():  # rewriting it would change its mtime, and a resume refuses changed input
        pq.write_table(pa.table({"url": [server.url(p) for p, _ in table], "caption": [c for _, c in table]}), urls)
    data = {"name": name, "input": {"files": [str(urls)]},
            "download": {"image_size": 64, "allow_private_addresses": True, "timeout": 5, "concurrency": 8},
            "filters": FILTERS, "output": {"dir": str(tmp_path / name), "samples_per_shard": 16},
            "execution": {"engine": "local", "progress": False, **execution}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_job(path)


@pytest.fixture(scope="module")
def output(tmp_path_factory, server):
    tmp = tmp_path_factory.mktemp("filtered")
    result = run_job(job_spec(tmp, server))
    assert result.ok
    return tmp, tmp / "filtered"


def table(out):
    """All status tables of the job, concatenated in shard order."""
    tables = [pq.read_table(p) for p in sorted(out.glob("*.parquet"))]
    return pa.concat_tables(tables, promote_options="default").to_pydict()


def test_each_filter_counts_its_rejections(output):
    _, out = output
    t = table(out)
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    per_filter = sum((Counter(s["filtered"]) for s in stats), Counter())
    assert per_filter == Counter(k for k in t["error_kind"] if k in FILTER_NAMES)
    assert per_filter["caption"] == 4 and per_filter["dedup_exact"] == 4  # rows 9,19,29,39 / 11,23,35,47
    assert [i for i, k in enumerate(t["error_kind"]) if k == "dedup_exact"] == [11, 23, 35, 47]
    assert per_filter["clip_score"] >= 8  # mismatched captions (every 4th) and the bottom of the rest


def test_top_fraction_threshold_is_in_the_manifest_and_applied(output):
    _, out = output
    manifest = json.loads((out / "manifest.json").read_text())
    state = manifest["stage_state"]["clip_score"]
    assert state["top_fraction"] == 0.6
    assert state["sample_size"] == 17  # the first 20 rows less those the caption (9, 19) and dedup (11) filters drop
    assert manifest["fingerprints"]["clip_score"]["pretrained_sha256"]
    t = table(out)
    scored = [(s, st) for s, st in zip(t["clip_score"], t["status"]) if s is not None]
    assert all(st in ("success", "filtered") for _, st in scored)
    assert min(s for s, st in scored if st == "success") >= state["threshold"]
    mismatched = [t["clip_score"][i] for i in range(2, N, 4) if t["clip_score"][i] is not None]
    assert np.mean([s < state["threshold"] for s in mismatched]) >= 0.9


def test_kept_samples_carry_scores_and_embeddings(output):
    _, out = output
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
        key = names[0].split(".")[0]
        meta = json.loads(tar.extractfile(f"{key}.json").read())
        emb = np.load(io.BytesIO(tar.extractfile(f"{key}.clip.npy").read()))
    assert {f"{key}.jpg", f"{key}.txt", f"{key}.json", f"{key}.clip.npy"} <= set(names)
    assert isinstance(meta["clip_score"], float) and meta["phash"] and meta["exact_group"] == key
    assert emb.dtype == np.float16 and emb.shape == (64,)


def test_resume_after_losing_shards_writes_the_same_bytes(output, server):
    tmp, out = output
    before = {p.name: p.read_bytes() for p in out.glob("0000*") if p.suffix in (".tar", ".parquet")}
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in ("00001", "00002"):  # as if the job had been killed after shard 0
        for suffix in (".tar", ".parquet", "_stats.json"):
            (out / f"{shard}{suffix}").unlink()
    assert run_job(job_spec(tmp, server)).ok
    after = {p.name: p.read_bytes() for p in out.glob("0000*") if p.suffix in (".tar", ".parquet")}
    assert after == before
    assert json.loads((out / "manifest.json").read_text())["stage_state"] == manifest["stage_state"]


def test_report_on_a_filtered_job(output, tmp_path):
    _, out = output
    page = write_report(out, tmp_path / "r.html").read_text()
    for name in ("caption", "dedup_exact", "clip_score"):
        assert f"<tr><td>{name}</td>" in page
    assert page.count("data:image/png;base64,") == 4


@pytest.mark.slow
def test_ray_runs_the_clip_actor_pool_to_the_same_shards(output, server, ray_cluster, tmp_path):
    _, reference = output
    assert run_job(job_spec(tmp_path, server, engine="ray", address=ray_cluster.address)).ok
    got = tmp_path / "filtered"
    assert {p.name: p.read_bytes() for p in got.glob("*.tar")} == \
        {p.name: p.read_bytes() for p in reference.glob("*.tar")}
