"""How a driver finds its Ray: the job's cluster under `ray job submit`, a cluster it is told to
join, or a private Ray on 127.0.0.1 that starts without greeting the user with warnings."""
import os
import subprocess
import sys

import pytest

from pipeline.executors.ray_connect import starts_local_ray


def test_which_addresses_start_a_private_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert starts_local_ray(None) and starts_local_ray("local")
    assert not starts_local_ray("auto") and not starts_local_ray("127.0.0.1:6379")
    assert not starts_local_ray("ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what `ray job submit` gives the job's driver
    assert not starts_local_ray(None) and starts_local_ray("local")


def test_a_local_run_is_on_loopback_with_token_auth_and_no_warning(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_USAGE_STATS_ENABLED"}
    env["HOME"] = str(tmp_path)  # Ray keeps its token in ~/.ray
    code = ("import ray; from pipeline.executors.ray_connect import connect_ray; connect_ray(None); "
            "print(sorted({n['NodeManagerAddress'] for n in ray.nodes()}), ray.get(ray.remote(lambda: 2).remote()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['127.0.0.1']", "2"]
    assert "Token authentication" not in out.stderr and "WARNING" not in out.stderr, out.stderr
    assert (tmp_path / ".ray" / "auth_token").exists()


def test_a_ray_client_connection_the_proxy_aborts_is_made_again(monkeypatch, caplog):
    """Ray Client's proxy now and then fails to start the server for a new driver
    (ConnectionAbortedError); the driver connects again rather than failing the job. Another
    error, or the last attempt's, reaches the caller."""
    import ray

    from pipeline.executors import ray_connect

    calls = []

    def init(address, **kwargs):
        calls.append(address)
        if len(calls) < 2:
            raise ConnectionAbortedError("Initialization failure from server: Starting Ray client server failed")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "nodes", lambda: [])
    monkeypatch.setattr(ray_connect, "CLIENT_RETRY_WAIT", 0.0)
    ray_connect.connect_ray("ray://127.0.0.1:1")
    assert calls == ["ray://127.0.0.1:1"] * 2
    assert "connecting again" in caplog.text

    def always(address, **kwargs):
        calls.append(address)
        raise ConnectionAbortedError("still failing")

    calls.clear()
    monkeypatch.setattr(ray, "init", always)
    with pytest.raises(ConnectionAbortedError, match="still failing"):
        ray_connect.connect_ray("ray://127.0.0.1:1")
    assert len(calls) == ray_connect.CLIENT_CONNECT_ATTEMPTS
