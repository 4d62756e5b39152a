"""clip_score + aesthetic + nsfw in one real job (a server on 127.0.0.1, the tiny CLIP, tiny heads in
the published layouts): one image pass per sample, scores in the status table and KEY.json, the
embedding column nowhere in the output, the top_fraction state in the manifest, reused on resume."""
import json
import tarfile
from collections import Counter

import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from filters.clip_score import IMAGE_EMBEDDING
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.testing import synthetic
from pipeline.testing.assets import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS
from pipeline.testing.clip_heads import aesthetic_state, nsfw_state, save_head
from pipeline.testing.serve import LocalServer

torch.set_num_threads(2)

N, PER_SHARD, SAMPLE = 24, 8, 8
CLIP = {"model": str(TINY_CLIP_CONFIG), "pretrained": str(TINY_CLIP_WEIGHTS)}
SCORES = ("clip_score", "aesthetic_score", "nsfw_score")


@pytest.fixture(scope="module")
def server():
    pairs = synthetic.make_pairs(N, seed=21, size=48)
    files = {f"{i}.jpg": synthetic.encode(im, "jpg", 90) for i, (im, _) in enumerate(pairs)}
    with LocalServer(files, content_type="image/jpeg") as srv:
        srv.captions = [c for _, c in pairs]
        yield srv


def job_spec(tmp_path, server, **execution):
    urls = tmp_path / "urls.parquet"
    if not urls.exists():  # rewriting it would change its mtime, and a resume refuses changed input
        pq.write_table(pa.table({"url": [server.url(f"{i}.jpg") for i in range(N)], "caption": server.captions}), urls)
    heads = tmp_path / "heads"
    filters = [
        {"clip_score": {**CLIP, "min": -1.0, "batch_size": 16}},
        {"aesthetic": {"checkpoint": str(save_head(heads / "aesthetic.pth", aesthetic_state(64, seed=1))), **CLIP,
                       "top_fraction": 0.75, "sample_size": SAMPLE}},
        {"nsfw": {"checkpoint": str(save_head(heads / "nsfw.pth", nsfw_state(64, seed=2))), **CLIP, "max": 0.7}},
    ]
    data = {"name": "heads", "input": {"files": [str(urls)]},
            "download": {"image_size": 48, "allow_private_addresses": True, "timeout": 5, "concurrency": 8},
            "filters": filters, "output": {"dir": str(tmp_path / "out"), "samples_per_shard": PER_SHARD},
            "execution": {"engine": "local", "progress": False, **execution}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    return load_job(tmp_path / "job.yaml")


@pytest.fixture
def image_passes(monkeypatch):
    """How many images went through the CLIP image tower."""
    count = Counter()
    original = open_clip.model.CLIP.encode_image

    def counted(self, image, *args, **kwargs):
        count["images"] += image.shape[0]
        return original(self, image, *args, **kwargs)

    monkeypatch.setattr(open_clip.model.CLIP, "encode_image", counted)
    return count


def test_one_image_pass_scores_written_thresholds_kept_on_resume(tmp_path, server, image_passes):
    assert run_job(job_spec(tmp_path, server)).ok
    out = tmp_path / "out"
    # every sample once through the image tower; aesthetic's top_fraction sample pass (in the driver,
    # once per job) runs the stages before it over the first SAMPLE rows: one more each
    assert image_passes["images"] == N + SAMPLE
    t = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))]).to_pydict()
    assert IMAGE_EMBEDDING not in t and all(len([v for v in t[c] if v is not None]) > 0 for c in SCORES)
    assert all(s is not None for s in t["clip_score"])  # min -1 keeps every row for the heads
    manifest = json.loads((out / "manifest.json").read_text())
    state = manifest["stage_state"]["aesthetic"]
    assert state["top_fraction"] == 0.75 and state["sample_size"] == SAMPLE and state["keep"] == "above"
    assert "nsfw" not in manifest["stage_state"] and manifest["fingerprints"]["aesthetic"]["checkpoint_sha256"]
    kinds = Counter(k for k in t["error_kind"] if k)
    assert kinds["aesthetic"] >= 3 and set(kinds) <= {"aesthetic", "nsfw"}
    for i, kind in enumerate(t["error_kind"]):
        if kind == "aesthetic":
            assert t["aesthetic_score"][i] < state["threshold"] and t["nsfw_score"][i] is None
        elif kind == "nsfw":
            assert t["nsfw_score"][i] > 0.7
        else:
            assert t["status"][i] == "success" and t["aesthetic_score"][i] >= state["threshold"]
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert sum((Counter(s["filtered"]) for s in stats), Counter()) == kinds
    with tarfile.open(out / "00000.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
        assert not [m.name for m in tar.getmembers() if "embedding" in m.name or m.name.endswith(".npy")]
    assert metas and all(set(SCORES) <= set(m) and IMAGE_EMBEDDING not in m for m in metas)

    # resume after losing shard 1: the manifest's threshold, no sample pass, one pass for its rows
    before = {s: (out / f"00001{s}").read_bytes() for s in (".tar", ".parquet")}
    for suffix in (".tar", ".parquet", "_stats.json"):
        (out / f"00001{suffix}").unlink()
    image_passes.clear()
    assert run_job(job_spec(tmp_path, server)).ok
    assert image_passes["images"] == PER_SHARD
    assert json.loads((out / "manifest.json").read_text())["stage_state"]["aesthetic"] == state
    assert {s: (out / f"00001{s}").read_bytes() for s in (".tar", ".parquet")} == before


@pytest.mark.slow
def test_ray_moves_the_embeddings_between_actors_to_the_same_shards(tmp_path, server, ray_cluster):
    local, ray = tmp_path / "local", tmp_path / "ray"
    local.mkdir(), ray.mkdir()
    assert run_job(job_spec(local, server)).ok
    assert run_job(job_spec(ray, server, engine="ray", address=ray_cluster.address)).ok
    for name in ("00000.tar", "00001.tar", "00002.tar", "00000.parquet", "00002.parquet"):
        assert (ray / "out" / name).read_bytes() == (local / "out" / name).read_bytes(), name
