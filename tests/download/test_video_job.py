"""A video job with spans end to end: `mmcurate run` killed with SIGKILL mid-job, then rerun, writes
the same shards byte for byte as an uninterrupted run."""
from __future__ import annotations

import io
import random
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml

from helpers.jobs import kill_then_rerun, status_tables
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job
from pipeline.testing.serve import LocalServer
from pipeline.testing.video_synth import read_counter, write_counter_video

pytestmark = pytest.mark.timeout(180)
N_VIDEOS, SPANS = 8, ((0.0, 1.2), (1.3, 2.5), (2.2, 3.9))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    files = {f"v{i}.mp4": write_counter_video(d / f"v{i}.mp4", 100, fps=25, gop=25, bframes=i % 3).read_bytes()
             for i in range(N_VIDEOS)}
    rng = random.Random(0)
    # Latency makes the job last a few seconds, so that a kill lands mid-job.
    with LocalServer(files, latency=lambda: rng.uniform(0.2, 0.4), content_type="video/mp4") as srv:
        yield srv


def job_file(tmp_path, server, name, **video):
    urls = tmp_path / "clips.parquet"
    if not urls.exists():
        rows = [(server.url(f"v{i}.mp4"), s, e) for i in range(N_VIDEOS) for s, e in SPANS]
        rows += [(server.url("gone.mp4"), 0.0, 1.0), (server.url("v0.mp4"), 9.0, 10.0)]  # 404, after the end
        random.Random(1).shuffle(rows)  # a shard holds clips of several videos, a video spans shards
        pq.write_table(pa.table({"url": [r[0] for r in rows], "caption": [f"clip {i}" for i in range(len(rows))],
                                 "clip_start": [r[1] for r in rows], "clip_end": [r[2] for r in rows]}), urls)
    data = {"name": name,
            "input": {"files": [str(urls)], "save_additional_columns": ["clip_start", "clip_end"]},
            "download": {"media": "video", "allow_private_addresses": True, "timeout": 10},
            "video": {"resolution": 64, "store_frames": True, "num_frames": 4, **video},
            "output": {"dir": str(tmp_path / name), "samples_per_shard": 3},
            "execution": {"engine": "local", "progress": False}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, server):
    tmp = tmp_path_factory.mktemp("reference")
    result = run_job(load_job(job_file(tmp, server, "ref")))
    assert result.ok and result.shards_written == 9
    return tmp / "ref"


def test_video_job_writes_clips_that_read_back(reference):
    samples = list(wds.WebDataset(sorted(str(p) for p in reference.glob("*.tar")), shardshuffle=False))
    assert len(samples) == N_VIDEOS * len(SPANS)
    for sample in samples:
        assert {"mp4", "frames.npy", "json", "txt"} <= set(sample)
    tables = [pq.read_table(p) for p in sorted(reference.glob("*.parquet"))]
    statuses = pa.concat_tables(tables, promote_options="default").to_pydict()
    kinds = sorted(k for k in statuses["error_kind"] if k)
    assert kinds == ["bad_span", "http_status"]


def test_sigkill_mid_job_then_rerun_gives_identical_shards(tmp_path, server, reference):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    path = job_file(tmp_path, server, "killed", tmp_dir=str(downloads))
    out = tmp_path / "killed"
    kill_then_rerun(path, out, reference, attempts=4, seed=2)
    assert status_tables(out) == status_tables(reference)
    assert not list(downloads.iterdir())  # what the killed runs left was swept
    # and the clips hold the frames of their spans
    with tarfile.open(out / "00000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".mp4"))
        import av

        with av.open(io.BytesIO(tar.extractfile(member).read())) as c:
            counters = [read_counter(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    assert counters == list(range(counters[0], counters[0] + len(counters))) and len(counters) >= 29
