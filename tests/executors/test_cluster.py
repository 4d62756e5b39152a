"""A job on a real Ray cluster (the session's ``ray_cluster``: separate ``ray start`` processes on
127.0.0.1) from every way in: a driver process joining with ``execution.address: auto``, ``ray job
submit`` (address left null: the job's ``RAY_ADDRESS``), Ray Client (``ray://``); output to S3;
and a worker node that dies mid-job. Each writes the same bytes as the same job run locally."""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path


from helpers.jobs import image_server, job_file, status_tables, tars
from pipeline.job.runner import run_job
from pipeline.job.spec import load_job

RAY = str(Path(sys.executable).with_name("ray"))


def mmcurate(env: dict, job: Path, *sets: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``mmcurate run job --set ...`` as its own process (a driver), with ``env``."""
    cmd = [sys.executable, "-m", "pipeline", "run", str(job), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout + done.stderr


def same_output(out: Path, reference: Path) -> None:
    assert tars(out) and tars(out) == tars(reference)
    assert status_tables(out) == status_tables(reference)


def download_tasks(cluster) -> list:
    """Every download task (``_task_step``) the cluster's state API knows of, any job's."""
    from ray.util.state import list_tasks

    return list_tasks(address=cluster.dashboard_url, filters=[("func_or_class_name", "=", "_task_step")],
                      limit=10_000, raise_on_missing_output=False, timeout=10)


def task_nodes(cluster, jobs_before: set) -> dict[str, set]:
    """Ray jobs that ran download tasks since ``jobs_before`` -> the nodes those ran on (task
    events reach the state API within a few seconds)."""
    deadline = time.monotonic() + 15
    while True:
        found: dict[str, set] = {}
        for t in download_tasks(cluster):
            if t.job_id not in jobs_before and t.node_id:
                found.setdefault(t.job_id, set()).add(t.node_id)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(1)


def test_a_driver_process_joins_with_auto_and_writes_what_local_writes(tmp_path, server, reference, ray_cluster):
    """``mmcurate run`` as its own driver process with ``address: auto`` (Ray resolves it through
    ``RAY_ADDRESS``, as on any machine with several Ray instances): the local run's bytes, and
    the download tasks ran on both nodes."""
    job = job_file(tmp_path, server, "auto", execution__engine="ray")
    before = {t.job_id for t in download_tasks(ray_cluster)}
    ok(mmcurate(ray_cluster.env, job, "execution.address=auto"))
    same_output(tmp_path / "auto", reference)
    nodes = task_nodes(ray_cluster, before)
    assert len(nodes) == 1, nodes  # one new Ray job: the driver process's
    assert next(iter(nodes.values())) == {n.node_id for n in ray_cluster.nodes}  # both nodes worked


def test_ray_job_submit_runs_the_job_on_the_cluster(tmp_path, server, reference, ray_cluster):
    """``ray job submit -- mmcurate run`` through the dashboard, address left null: the job's
    driver, started by the head's job manager, joins the cluster through ``RAY_ADDRESS``."""
    job = job_file(tmp_path, server, "submitted", execution__engine="ray")  # address null: RAY_ADDRESS
    env = dict(ray_cluster.env)
    env.pop("RAY_ADDRESS")  # the job's driver gets the cluster's address from the job manager only
    submission = f"mmcurate-{uuid.uuid4().hex[:8]}"
    cmd = [RAY, "job", "submit", "--address", ray_cluster.dashboard_url, "--submission-id", submission,
           "--", sys.executable, "-m", "pipeline", "run", str(job), "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    text = ok(done)
    assert f"Job '{submission}' succeeded" in text, text[-3000:]
    assert "samples in tars" in text  # the driver's own summary, streamed back by ray job submit
    same_output(tmp_path / "submitted", reference)


def test_ray_client_address(tmp_path, server, reference, ray_cluster):
    """``address: ray://...`` (Ray Client, with token authentication): the same bytes."""
    job = job_file(tmp_path, server, "client", execution__engine="ray")
    env = dict(ray_cluster.env)
    env.pop("RAY_ADDRESS")
    done = mmcurate(env, job, f"execution.address={ray_cluster.client_address}")
    assert done.returncode == 0, (f"exit {done.returncode}\n{done.stderr[-4000:]}\n"
                                  + ray_cluster.logs("ray_client_server*"))  # the proxy's, the client's server
    same_output(tmp_path / "client", reference)


def test_output_to_s3_from_the_cluster_reads_back(tmp_path, server, reference, ray_cluster, s3):
    """Output to S3 (moto) from the cluster's workers; read back by the loader from the
    ``s3://`` URL and by plain WebDataset through a pipe: the local run's samples."""
    import webdataset as wds

    from helpers.s3 import BUCKET
    from pipeline.loader import ShardDataset

    url = s3.url("cluster")
    job = job_file(tmp_path, server, "s3", output__dir=url, execution__engine="ray")
    ok(mmcurate(ray_cluster.env, job, "execution.address=auto"))  # workers write straight to S3
    names = [k.split("/", 1)[1] for k in s3.keys("cluster/")]
    assert names == sorted(p.name for p in reference.iterdir() if not p.name.startswith("."))
    for name, data in tars(reference).items():
        assert s3.client().get_object(Bucket=BUCKET, Key=f"cluster/{name}")["Body"].read() == data

    def samples(source):
        return [{k: v for k, v in s.items() if k not in ("__url__", "__worker__", "__step__")}
                for s in ShardDataset(source, decode=False)]

    expected = samples(str(reference))
    assert len(expected) == 54 and samples(url) == expected  # 60 rows, 6 dead links
    # and the plain WebDataset way: each shard streamed from S3 by a pipe
    copy = "import sys, shutil, fsspec; shutil.copyfileobj(fsspec.open(sys.argv[1]).open(), sys.stdout.buffer)"
    reader = f'{sys.executable} -c "{copy}"'
    shards = [f"pipe:{reader} {url}/{name}" for name in sorted(tars(reference))]

    def members(urls):
        return [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
                for s in wds.WebDataset(urls, shardshuffle=False)]

    got = members(shards)
    want = members([str(p) for p in sorted(reference.glob("*.tar"))])
    assert got == want and len(got) == len(expected)


def test_a_worker_node_killed_mid_job(tmp_path, ray_cluster):
    """SIGKILL a whole worker node (raylet, agents, its workers) while it runs download tasks:
    the run still completes every shard, on the nodes left, byte-identical to a local run; and
    a rerun has nothing left to do."""
    rows, delay = 128, [0.0]  # 16 shards; the latency is switched on for the cluster run only
    with image_server(latency=lambda: delay[0]) as srv:
        reference = job_file(tmp_path, srv, "ref", rows=rows)
        assert run_job(load_job(reference)).ok
        doomed = ray_cluster.add_node(num_cpus=2, resources={"doomed": 1})
        try:
            delay[0] = 0.3  # 8 rows at concurrency 1: > 2.4 s a shard
            job = job_file(tmp_path, srv, "killed", rows=rows, execution__engine="ray",
                           download__concurrency=1)
            out = tmp_path / "killed"
            cmd = [sys.executable, "-m", "pipeline", "run", str(job), "--no-progress",
                   "--set", "execution.address=auto"]
            proc = subprocess.Popen(cmd, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            try:
                deadline = time.monotonic() + 120
                while not (len(list(out.glob("*_stats.json"))) >= 2 and doomed.running("ray::_task_step")):
                    assert proc.poll() is None, proc.communicate()
                    assert time.monotonic() < deadline, "no download task ever ran on the extra node"
                    time.sleep(0.2)
                done_at_kill = len(list(out.glob("*_stats.json")))
                ray_cluster.kill_node(doomed)
                stdout, stderr = proc.communicate(timeout=240)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            assert done_at_kill < rows // 8, "the job finished before the node was killed"
            first, complete = proc.returncode, len(list(out.glob("*_stats.json")))
            delay[0] = 0.0
            rerun = ok(mmcurate(ray_cluster.env, job, "execution.address=auto"))
            same_output(out, tmp_path / "ref")
            assert (first, complete) == (0, rows // 8), (
                f"the run that lost a node ({done_at_kill} shards done at the kill) ended with exit {first} "
                f"and {complete} of {rows // 8} shards complete:\n{stdout[-2000:]}\n{stderr[-4000:]}")
            assert f"({rows // 8} already complete, 0 written, 0 failed)" in rerun, rerun
        finally:
            delay[0] = 0.0
            if not doomed.killed:
                ray_cluster.kill_node(doomed)
        ray_cluster.wait_for_nodes(2)  # the GCS has noticed: the other tests see two nodes


def test_nothing_reached_beyond_loopback(ray_cluster):
    """Every process of the cluster and of the drivers above ran with the loopback guard; it only
    ever had to refuse the dashboard's cloud and usage probes, and every node is on 127.0.0.1."""
    import ray

    assert ray_cluster.unexpected_refusals() == []
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
