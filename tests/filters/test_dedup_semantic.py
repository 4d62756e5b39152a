"""semantic_dedup: near-duplicates (re-encoded, resized, slightly cropped copies made with PIL)
spread over shards are removed, distinct images kept, the first in input order wins, the
centroids live in the manifest state and the kept set is rebuilt from written status tables.

The embeddings come from the real shared CLIP pass (the image-only clip_score stage build_filters
puts before semantic_dedup) with the project's tiny CLIP (models/tiny-clip): on these synthetic
images its cosine between copies of one image is above THRESHOLD and between different images
below it (checked by ``test_tiny_clip_tells_copies_from_other_images``), so the dedup runs on a
real embedding."""
import copy
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers.jobs import kill_then_rerun
from PIL import Image

from filters import build_filters
from filters.clip_score import IMAGE_EMBEDDING
from filters.dedup_semantic import (CLUSTER, EMBEDDING, GROUP, SIMILARITY, decode_f16, encode_f16,
                                    spherical_kmeans)
from pipeline.core import schema
from pipeline.core.config import ConfigError
from pipeline.core.stage import JobContext
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.sinks.webdataset import status_table
from pipeline.testing import synthetic
from pipeline.testing.assets import TINY_CLIP_CONFIG, TINY_CLIP_WEIGHTS
from pipeline.testing.serve import LocalServer

torch.set_num_threads(2)

SEED, SIZE, CROP = 7, 96, 2
THRESHOLD = 0.88  # between the copies' lowest cosine and other images' highest (checked below)
OPTIONS = {"model": str(TINY_CLIP_CONFIG), "pretrained": str(TINY_CLIP_WEIGHTS), "threshold": THRESHOLD,
           "n_clusters": 3, "sample_size": 32}


def originals(n=18):
    return [im for im, _ in synthetic.make_pairs(n, seed=SEED, size=SIZE)]


def variant(image, how):
    """A near-duplicate: re-encoded at JPEG quality 40, resized to 3/4, or cropped CROP px a side."""
    if how == "jpeg":
        return Image.open(io.BytesIO(synthetic.encode(image, "jpg", 40))).convert("RGB")
    if how == "resize":
        return image.resize((SIZE * 3 // 4, SIZE * 3 // 4), Image.BICUBIC)
    if how == "crop":
        return image.crop((CROP, CROP, SIZE - CROP, SIZE - CROP))
    return image


# (image, how) per row, 8 rows per shard: copies of an image land in later shards (and one in the
# same shard); image 16 comes first as a crop, so the crop is the one kept.
LAYOUT = [
    [(i, "") for i in range(8)],
    [(8, ""), (9, ""), (10, ""), (11, ""), (0, "jpeg"), (1, "resize"), (2, "crop"), (8, "jpeg")],
    [(0, "crop"), (5, "resize"), (12, ""), (16, "crop"), (9, "crop"), (13, ""), (3, "jpeg"), (14, "")],
    [(12, "resize"), (16, ""), (15, ""), (7, "crop"), (17, ""), (4, "resize"), (14, "jpeg"), (6, "")],
]


def shard_batches():
    ims = originals()
    batches = []
    for shard_id, rows in enumerate(LAYOUT):
        pairs = [(variant(ims[i], how), f"picture {i} {how}") for i, how in rows]
        batches.append(synthetic.make_batch(pairs, shard_id=shard_id))
    return batches


def first_keys(batches):
    """The key of the first row of each image in input order: the ones semantic dedup keeps."""
    first = {}
    for rows, batch in zip(LAYOUT, batches):
        for (i, _), key in zip(rows, batch[schema.KEY]):
            first.setdefault(i, key)
    return first


@pytest.fixture(scope="module")
def embedder():
    """The job's shared CLIP pass, as build_filters adds it before semantic_dedup: an image-only
    clip_score stage of the tiny CLIP that puts the embeddings under ``IMAGE_EMBEDDING``."""
    stages = build_filters([{"semantic_dedup": OPTIONS}], check=True)
    assert [s.name for s in stages] == ["clip_score", "semantic_dedup"]
    assert stages[0].share_embeddings and not stages[0].config.captions
    return stages[0]


def dedup_stage(**options):
    *_, stage = build_filters([{"semantic_dedup": {**OPTIONS, **options}}], check=True)
    return stage


def embed(embedder, images):
    batch = embedder.process(synthetic.make_batch([(im, "") for im in images]))
    return np.stack(batch[IMAGE_EMBEDDING])


def context_over(batches, embedder):
    """As the job's sample pass: the first rows, run through the stages before (the embedding)."""
    def sample_batches(n_rows):
        left = n_rows
        for batch in batches:
            batch = embedder.process({k: list(v[:left]) for k, v in batch.items()})
            yield batch
            left -= schema.batch_len(batch)
            if left <= 0:
                return
    return JobContext(sample_batches)


def prepared(embedder, batches, **options):
    stage = dedup_stage(**options)
    state = stage.prepare(context_over(batches, embedder))
    stage.restore(json.loads(json.dumps(state)))  # as the manifest hands it back
    return stage, state


def run_shards(stage, embedder, batches):
    return [stage.process(embedder.process(b)) for b in batches]


def written(batch, stage):
    """The batch as its status table on disk reads back (what an ordered stage's resume sees)."""
    types = {**schema.COLUMN_TYPES, **stage.columns}
    clean = {k: v for k, v in batch.items() if k != IMAGE_EMBEDDING}
    buf = io.BytesIO()
    pq.write_table(status_table(clean, types), buf)
    return pq.read_table(io.BytesIO(buf.getvalue())).to_pydict()


def kept_keys(batches):
    return [k for b in batches for k, s in zip(b[schema.KEY], b[schema.STATUS]) if s == schema.PENDING]


def test_tiny_clip_tells_copies_from_other_images(embedder):
    ims = originals()
    copies = [[im] + [variant(im, how) for how in ("jpeg", "resize", "crop")] for im in ims]
    e = embed(embedder, [v for group in copies for v in group]).reshape(len(ims), 4, -1)
    same = min(float(e[i, a] @ e[i, b]) for i in range(len(ims)) for a in range(4) for b in range(a + 1, 4))
    other = max(float(e[i, a] @ e[j, b]) for i in range(len(ims)) for j in range(i + 1, len(ims))
                for a in range(4) for b in range(4))
    assert other < THRESHOLD <= same


def test_near_duplicates_across_shards_are_removed_and_the_first_is_kept(embedder):
    batches = shard_batches()
    stage, _ = prepared(embedder, batches)
    out = run_shards(stage, embedder, batches)
    first = first_keys(batches)
    assert kept_keys(out) == sorted(first.values())  # every distinct image once, the first copy
    assert first[16].startswith("00002")  # image 16: its crop (shard 2) is kept, the original dropped
    groups = {k: g for b in out for k, g in zip(b[schema.KEY], b[GROUP])}
    for rows, batch in zip(LAYOUT, out):
        for j, (i, _) in enumerate(rows):
            key = batch[schema.KEY][j]
            assert groups[key] == first[i]
            if key != first[i]:
                assert batch[schema.STATUS][j] == schema.FILTERED
                assert batch[schema.ERROR_KIND][j] == "semantic_dedup"
                assert f"kept {first[i]}" in batch[schema.ERROR_MESSAGE][j]
                assert batch[SIMILARITY][j] >= THRESHOLD and batch[schema.FILES][j] == {}
                assert batch[EMBEDDING][j] is None  # only kept rows carry their embedding
            else:
                assert batch[EMBEDDING][j] and batch[CLUSTER][j] in range(3)
                assert batch[SIMILARITY][j] is None or batch[SIMILARITY][j] < THRESHOLD


def test_centroids_are_computed_once_deterministically_and_kept_small(embedder):
    batches = shard_batches()
    _, state = prepared(embedder, batches)
    _, again = prepared(embedder, batches)
    assert state == again and state["n_clusters"] == 3 and state["sample_size"] == 32
    centroids = decode_f16(state["centroids"], state["dim"])
    assert centroids.shape == (3, 64)
    assert np.allclose(np.linalg.norm(centroids.astype(np.float32), axis=1), 1, atol=1e-2)
    assert len(json.dumps(state)) < 3 * 64 * 2 * 4 / 3 + 200  # float16 base64, not JSON floats


def test_resume_from_written_status_tables_gives_the_same_kept_set(embedder):
    batches = shard_batches()
    stage, state = prepared(embedder, batches)
    straight = run_shards(stage, embedder, shard_batches())
    # A killed job: shards 0 and 1 are on disk; a new process restores the state and replays them.
    resumed = dedup_stage()
    resumed.restore(json.loads(json.dumps(state)))
    for batch in straight[:2]:
        resumed.resume(written(batch, resumed))
    rest = run_shards(resumed, embedder, shard_batches()[2:])
    for a, b in zip(straight[2:], rest):
        assert a[schema.STATUS] == b[schema.STATUS] and a[GROUP] == b[GROUP]
        assert a[schema.ERROR_MESSAGE] == b[schema.ERROR_MESSAGE]
    # Without the replay the copies in shards 2-3 of shard 0-1 images would be kept: the test can fail.
    fresh = dedup_stage()
    fresh.restore(state)
    assert kept_keys(run_shards(fresh, embedder, shard_batches()[2:])) != kept_keys(rest)


def test_rows_without_an_embedding_are_left_alone_and_a_missing_pass_is_named(embedder):
    batches = shard_batches()
    stage, _ = prepared(embedder, batches)
    fresh = copy.deepcopy(stage)  # the same shard again below: a stage that has not seen it
    batch = embedder.process(shard_batches()[0])
    batch[IMAGE_EMBEDDING][3] = None  # e.g. an image clip_score could not decode
    out = stage.process(batch)
    assert out[schema.STATUS][3] == schema.PENDING and out[CLUSTER][3] is None
    bad = embedder.process(shard_batches()[0])
    bad[IMAGE_EMBEDDING][1] = np.full(64, np.nan, dtype=np.float32)
    bad[IMAGE_EMBEDDING][2] = np.zeros(64, dtype=np.float32)
    out = fresh.process(bad)
    assert [out[schema.ERROR_KIND][i] for i in (1, 2)] == ["stage_error"] * 2
    assert "not a finite non-zero vector" in out[schema.ERROR_MESSAGE][1]
    assert out[schema.STATUS][0] == schema.PENDING  # the others go on
    with pytest.raises(RuntimeError, match="clip_image_embedding"):
        stage.process(shard_batches()[1])


def test_spherical_kmeans_finds_separated_groups_and_caps_k():
    rng = np.random.default_rng(0)
    axes = np.eye(8, dtype=np.float32)[:3]
    points = np.concatenate([a + 0.05 * rng.standard_normal((20, 8)).astype(np.float32) for a in axes])
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    centroids = spherical_kmeans(points, 3, seed=0)
    assert sorted(int(np.argmax(centroids @ a)) for a in axes) == [0, 1, 2]
    assert np.all(np.max(centroids @ axes.T, axis=0) > 0.99)
    assert spherical_kmeans(np.repeat(points[:2], 5, axis=0), 4, seed=0).shape == (2, 8)
    assert np.array_equal(spherical_kmeans(points, 3, seed=1), spherical_kmeans(points, 3, seed=1))


def test_float16_text_round_trip():
    v = np.random.default_rng(1).standard_normal((2, 5)).astype(np.float32)
    assert np.array_equal(decode_f16(encode_f16(v), 5), v.astype(np.float16))


@pytest.mark.parametrize("key,value", [("threshold", 1.5), ("threshold", -1), ("n_clusters", 0), ("sample_size", 0)])
def test_bad_options_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"filters\[0\]\.semantic_dedup\.{key}"):
        build_filters([{"semantic_dedup": {key: value}}])


# -- in a real job: download from 127.0.0.1, the shared CLIP pass, four shards -----------------
def job_rows():
    """The LAYOUT's images as files on the server, one URL per row (8 rows per shard)."""
    ims = originals()
    files, urls = {}, []
    for shard_id, rows in enumerate(LAYOUT):
        for j, (i, how) in enumerate(rows):
            name = f"{shard_id}-{j}.jpg"
            files[name] = synthetic.encode(variant(ims[i], how), "jpg", 90)
            urls.append((name, f"picture {i} {how}"))
    return files, urls


@pytest.fixture(scope="module")
def server():
    files, _ = job_rows()
    # a little latency, so that a killed run is killed in the middle of the job
    with LocalServer(files, content_type="image/jpeg", latency=lambda: 0.15) as srv:
        yield srv


def job_path(tmp_path, server, name="semantic"):
    urls = tmp_path / "urls.parquet"
    if not urls.exists():  # rewriting it would change its mtime, and a resume refuses changed input
        _, rows = job_rows()
        pq.write_table(pa.table({"url": [server.url(p) for p, _ in rows], "caption": [c for _, c in rows]}), urls)
    data = {"name": name, "input": {"files": [str(urls)]},
            "download": {"image_size": 64, "allow_private_addresses": True, "timeout": 5, "concurrency": 2},
            "filters": [{"semantic_dedup": OPTIONS}], "output": {"dir": str(tmp_path / name), "samples_per_shard": 8},
            "execution": {"engine": "local", "progress": False}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def job_table(out):
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))],
                            promote_options="default").to_pydict()


def expected_kept():
    """Keys (as the job makes them) of the first copy of each image in input order."""
    first = {}
    for shard_id, rows in enumerate(LAYOUT):
        for j, (i, _) in enumerate(rows):
            first.setdefault(i, schema.make_key(shard_id, j, 8))
    return sorted(first.values())


@pytest.fixture(scope="module")
def job(tmp_path_factory, server):
    tmp = tmp_path_factory.mktemp("semantic")
    path = job_path(tmp, server)
    assert run_job(load_job(path)).ok
    return tmp, path, tmp / "semantic"


def test_a_job_removes_copies_spread_over_shards(job):
    _, _, out = job
    t = job_table(out)
    assert sorted(k for k, s in zip(t["key"], t["status"]) if s == schema.SUCCESS) == expected_kept()
    assert set(k for k, s in zip(t["error_kind"], t["status"]) if s != schema.SUCCESS) == {"semantic_dedup"}
    manifest = json.loads((out / "manifest.json").read_text())
    state = manifest["stage_state"]["semantic_dedup"]
    assert state["n_clusters"] == 3 and state["sample_size"] == 32 and decode_f16(state["centroids"], 64).shape == (3, 64)
    with tarfile.open(out / "00000.tar") as tar:
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert meta["semantic_group"] == "000000000" and meta["semantic_cluster"] in range(3)
    assert IMAGE_EMBEDDING not in meta and IMAGE_EMBEDDING not in t  # the shared pass is never written
    assert EMBEDDING not in meta  # the job's own state: in the status table (binary), not for trainers
    assert pq.read_schema(out / "00000.parquet").field(EMBEDDING).type == pa.binary()


def test_the_centroids_of_the_manifest_are_the_ones_used_on_resume(job, server):
    tmp, path, out = job
    before = job_table(out)
    manifest = json.loads((out / "manifest.json").read_text())
    state = manifest["stage_state"]["semantic_dedup"]
    # Reverse the centroids in the manifest and redo every shard: a rerun that recomputed them
    # would give the old cluster ids; one that reads the manifest gives them reversed.
    state["centroids"] = encode_f16(decode_f16(state["centroids"], 64)[::-1])
    (out / "manifest.json").write_text(json.dumps(manifest))
    for p in out.glob("0000*"):
        p.unlink()
    assert run_job(load_job(path)).ok
    after = job_table(out)
    assert after["status"] == before["status"] and after["semantic_group"] == before["semantic_group"]
    assert after["semantic_cluster"] == [None if c is None else 2 - c for c in before["semantic_cluster"]]
    assert json.loads((out / "manifest.json").read_text())["stage_state"]["semantic_dedup"] == state


@pytest.mark.slow
def test_kill_9_and_rerun_gives_the_same_kept_set(tmp_path, server):
    (tmp_path / "ref").mkdir()
    reference = job_path(tmp_path / "ref", server)
    assert run_job(load_job(reference)).ok
    path = job_path(tmp_path, server, name="killed")
    kill_then_rerun(path, tmp_path / "killed", tmp_path / "ref" / "semantic", attempts=4, seed=3)
    kept = [job_table(d) for d in (tmp_path / "killed", tmp_path / "ref" / "semantic")]
    assert kept[0]["status"] == kept[1]["status"] and kept[0]["semantic_group"] == kept[1]["semantic_group"]
