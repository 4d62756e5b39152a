"""Joining or starting Ray: the one place that knows how a driver gets a Ray to run on.

``execution.address``:

* ``null``: inside ``ray job submit`` (``RAY_ADDRESS`` set) the job's cluster; otherwise a private
  Ray on this machine, started for the job and bound to 127.0.0.1.
* ``local``: always that private Ray.
* ``auto``, ``host:port``, ``ray://host:port``: join that cluster and use its node addresses as
  Ray reports them (``ray://`` goes through Ray Client, ``mmcurate[cluster]``).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

log = logging.getLogger("mmcurate")

# Ray Client's proxy starts a server process per driver; that start fails now and then (its log
# says only "SpecificServer startup failed", ray-project/ray#28091) and a new connection works.
CLIENT_CONNECT_ATTEMPTS = 3
CLIENT_RETRY_WAIT = 2.0  # seconds before the second attempt, doubled after

# Ray announces on every new local cluster that it turned token authentication on (as it should).
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def starts_local_ray(address: Optional[str]) -> bool:
    """Whether ``address`` means a private Ray started for this job rather than a cluster."""
    return address == "local" or (address is None and not os.environ.get("RAY_ADDRESS"))


def pin_ray_to_loopback() -> None:
    """Keep a Ray that this process starts on 127.0.0.1. Ray rewrites 127.0.0.1 (even an explicit
    node IP) to the host's network address unless it believes multi-host clusters are off; say
    so, here and in the environment that Ray's worker processes inherit."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def connect_ray(address: Optional[str]) -> None:
    """Join the cluster ``address`` names, or start the private local Ray; see the module docstring."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(log_to_driver=True, logging_level="WARNING")
    if starts_local_ray(address):
        pin_ray_to_loopback()
        announcer = logging.getLogger(TOKEN_AUTH_LOGGER)
        level = announcer.level
        announcer.setLevel(logging.ERROR)  # the private Ray keeps Ray's default (a token), quietly
        try:
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
        finally:
            announcer.setLevel(level)
        return
    if address is not None and address.startswith("ray://"):
        try:
            import grpc  # noqa: F401  (what Ray Client needs and Ray alone lacks)
        except ImportError:
            raise RuntimeError(f"execution.address: {address!r} uses Ray Client, which needs "
                               "`pip install 'mmcurate[cluster]'` (ray[client])") from None
        kwargs = dict(log_to_driver=True)  # Ray Client takes no logging level
        _connect_client(address, kwargs)
    else:
        ray.init(address=address, **kwargs)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    log.info("joined a Ray cluster of %d nodes (%s)", len(nodes),
             ", ".join(sorted({n["NodeManagerAddress"] for n in nodes})))


def _connect_client(address: str, kwargs: dict[str, Any]) -> None:
    """``ray.init`` through Ray Client, tried again when the proxy fails to start our server."""
    import ray

    wait = CLIENT_RETRY_WAIT
    for attempt in range(1, CLIENT_CONNECT_ATTEMPTS + 1):
        try:
            ray.init(address=address, **kwargs)
            return
        except ConnectionAbortedError as e:
            if attempt == CLIENT_CONNECT_ATTEMPTS:
                raise
            log.warning("Ray Client at %s: %s; connecting again in %.0f s", address,
                        " ".join(str(e).split())[-200:], wait)
            time.sleep(wait)
            wait *= 2
