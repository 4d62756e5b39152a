"""Shared fixtures: one real two-node Ray cluster on 127.0.0.1 per test session, and the counter
videos the video tests cut and download."""
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
def ray_cluster():
    """A head node and a worker node, both bound to 127.0.0.1, no dashboard; connected driver.

    Yields the cluster; ``ray_cluster.address`` is what ``execution.address`` takes.
    """
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.executors.ray_connect import pin_ray_to_loopback

    pin_ray_to_loopback()

    node = {"num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "object_store_memory": 300 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, resources={"head": 1}))
    cluster.add_node(**dict(node, resources={"worker": 1}))
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Counter videos in several codecs and containers (helpers.videos), written once."""
    from helpers.videos import write_videos

    return write_videos(tmp_path_factory.mktemp("videos"))
