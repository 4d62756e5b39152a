"""Joining or starting Ray: the one place that knows how a driver gets a Ray to run on."""
from __future__ import annotations

import os
import urllib.parse
from typing import Any, Optional


def is_loopback(address: Optional[str]) -> bool:
    if address in (None, "local", "auto"):
        return True
    host = urllib.parse.urlsplit(address if "://" in address else f"//{address}").hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def pin_ray_to_loopback() -> None:
    """Keep Ray on 127.0.0.1. Ray rewrites 127.0.0.1 (even an explicit node IP) to the host's
    network address unless it believes multi-host clusters are off; say so, here and in the
    environment that Ray's worker processes inherit."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def connect_ray(address: Optional[str]) -> None:
    """Start a local Ray on 127.0.0.1 (no dashboard), or join ``address`` ("auto", ray://...)."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True, logging_level="WARNING")
    if is_loopback(address):
        pin_ray_to_loopback()
        kwargs["_node_ip_address"] = "127.0.0.1"
    ray.init(address=address or "local", **kwargs)
