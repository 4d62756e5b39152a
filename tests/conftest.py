"""Shared fixtures: one real two-node Ray cluster on 127.0.0.1 per test session, the counter
videos the video tests cut and download, an S3 server."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# helpers/ asserts too (the SIGKILL check in helpers.jobs): rewrite them like a test module's.
pytest.register_assert_rewrite("helpers")

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real two-node Ray cluster on 127.0.0.1 (helpers.ray_cluster): a head node
    (``{"head": 1}``, 2 CPUs, dashboard and Ray Client server) and a worker node (``{"worker": 1}``,
    2 CPUs), each its own ``ray start --block`` process, with token authentication; this process
    is connected to it as a driver.

    Yields the ``RayCluster``: ``.address`` is what ``execution.address`` takes, ``.env`` the
    environment of a driver process (``mmcurate run``, ``ray job submit``), ``.dashboard_url`` and
    ``.client_address`` the job-submission and ``ray://`` addresses. The nodes get the S3 server's
    environment (``s3_server.env``), as a cluster's machines get their storage credentials, so
    that the workers can write to it (which is why this fixture starts ``s3_server``).
    """
    import shutil

    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    from helpers.ray_cluster import RayCluster, pin_this_process, short_root

    cluster = RayCluster(short_root(), node_env=s3_server.env)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    try:
        head = cluster.start_head(num_cpus=2, resources={"head": 1}, wait=False)
        worker = cluster.add_node(num_cpus=2, resources={"worker": 1}, wait=False)
        cluster.wait_ready([head, worker])
        cluster.wait_for_nodes(2)
        # this process as a driver: same token, same loopback pin as the cluster's processes
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.token)
        Config.initialize("")                            # Ray caches the auth mode ...
        AuthenticationTokenLoader.instance().reset_cache()  # ... and the token
        pin_this_process()
        if ray.is_initialized():  # a private Ray an earlier test started in this process
            ray.shutdown()
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        addresses = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        assert addresses == {"127.0.0.1"}, f"the cluster's nodes are not on loopback: {addresses}"
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        beyond = cluster.unexpected_refusals()
        if os.environ.get("MMCURATE_TEST_KEEP_RAY_LOGS") != "1":  # set it to keep the nodes' logs
            shutil.rmtree(cluster.root, ignore_errors=True)
    assert not beyond, f"processes of the test cluster tried to reach beyond 127.0.0.1: {beyond}"


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Counter videos in several codecs and containers (helpers.videos), written once."""
    from helpers.videos import write_videos

    return write_videos(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="session")
def s3_server():
    """moto_server on 127.0.0.1 for the whole session, reached through the AWS environment."""
    from helpers.s3 import serve

    yield from serve()


@pytest.fixture
def s3(s3_server):
    """The S3 server with an empty test bucket."""
    s3_server.reset()
    return s3_server


@pytest.fixture(scope="session")
def server():
    """helpers.jobs.image_server for the session (a module may define its own ``server``)."""
    from helpers.jobs import image_server

    with image_server() as srv:
        yield srv


@pytest.fixture(scope="session")
def reference(tmp_path_factory, server) -> Path:
    """helpers.jobs.job_file's job under the local engine, in this process: what every engine and
    every storage must write, byte for byte."""
    from helpers.jobs import job_file
    from pipeline.job.runner import run_job
    from pipeline.job.spec import load_job

    tmp = tmp_path_factory.mktemp("reference")
    assert run_job(load_job(job_file(tmp, server, "ref"))).ok
    return tmp / "ref"
