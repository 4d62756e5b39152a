"""A real multi-node Ray cluster on this machine for the tests: each node is its own
``ray start --block`` process (the head with the GCS, the dashboard and the Ray Client server;
worker nodes joining it), all bound to 127.0.0.1, with token authentication on.

Why a sitecustomize: Ray turns 127.0.0.1 into this host's network address (``ray start
--address``, ``--node-ip-address``, a driver's ``ray.init("auto" | "127.0.0.1:PORT")``) whenever
multi-node clusters are enabled, and a worker node refuses to start when they are not. The test
machine may only talk to loopback, so every process of a test cluster, and every driver started
against it, imports ``sitecustomize.py`` from a directory put first on ``PYTHONPATH``; with
``MMCURATE_TEST_PIN_LOOPBACK=1`` it makes Ray's "which of my addresses do others reach me on"
answer 127.0.0.1, and refuses (and logs, ``RayCluster.refused``) any Python-level connection or
name lookup beyond loopback. The pytest process, an in-process driver, gets the address patch
from ``pin_this_process``. Nothing of this is product code: a real cluster has real addresses.

The cluster also gets token authentication (a fresh token per cluster, in ``RAY_AUTH_TOKEN`` of
every node and driver), its own ports (never Ray's defaults, so several sessions can run side by
side) and a short temp dir per node (Ray's Unix sockets live there).

Processes are stopped by PID only (the ``ray start --block`` process stops its children on
SIGTERM; whatever of the node is left, found by a mark in each process's environment, is then
killed by PID), never with ``ray stop``.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PIN_FLAG = "MMCURATE_TEST_PIN_LOOPBACK"
NODE_MARK = "MMCURATE_TEST_RAY_NODE"
NET_LOG = "MMCURATE_TEST_NET_LOG"
LOOPBACK = "127.0.0.1"
RAY = str(Path(sys.executable).with_name("ray"))

SITECUSTOMIZE = f'''\
"""Written by tests/helpers/ray_cluster.py for a test Ray cluster; see its docstring.

Active only with {PIN_FLAG}=1 (the test cluster's processes and drivers). The test machine may
only reach loopback:

* Ray resolves "127.0.0.1" to the host's outward address whenever multi-node clusters are enabled
  (ray._private.services.get_node_ip_address -> node_ip_address_from_perspective): that answer is
  made 127.0.0.1, patched in as soon as ray._private.services is imported (without importing Ray
  in processes that never use it).
* Any Python-level connection or name lookup for a host that is not loopback is refused (as an
  unreachable network) and written to ${NET_LOG}: Ray's dashboard, for one, probes cloud metadata
  servers (169.254.169.254, metadata.google.internal) and usage-stats.ray.io even with usage stats
  disabled.
"""
import os
import sys

if os.environ.get("{PIN_FLAG}") == "1":
    import errno
    import importlib.abc
    import importlib.machinery
    import socket

    def _loopback(*args, **kwargs):
        return "{LOOPBACK}"

    class _PinLoopback(importlib.abc.MetaPathFinder):
        target = "ray._private.services"

        def find_spec(self, name, path, target=None):
            if name != self.target:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def patched(module):
                exec_module(module)
                module.node_ip_address_from_perspective = _loopback

            spec.loader.exec_module = patched
            return spec

    sys.meta_path.insert(0, _PinLoopback())

    _LOCAL_NAMES = {{"", "localhost", "0.0.0.0", "::", "::1", socket.gethostname()}}
    _NET_LOG = os.environ.get("{NET_LOG}")

    def _is_local(host):
        if isinstance(host, bytes):
            host = host.decode(errors="replace")
        if not isinstance(host, str):
            return True  # None: a wildcard bind
        host = host.strip("[]")
        return host in _LOCAL_NAMES or host.startswith("127.") or host.startswith("::ffff:127.")

    def _loopback_only(event, args):
        if not event.startswith("socket."):
            return
        if event == "socket.getaddrinfo":
            host = args[0]
        elif event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
            address = args[1]
            if not isinstance(address, tuple) or not address:
                return  # a Unix socket
            host = address[0]
        else:
            return
        if _is_local(host):
            return
        if _NET_LOG:
            with open(_NET_LOG, "a") as log:
                log.write(f"{{os.getpid()}} {{' '.join(sys.argv[:2])}} {{event}} {{host}}\\n")
        if event == "socket.getaddrinfo":
            raise socket.gaierror(socket.EAI_NONAME, f"test cluster: {{host}} is not loopback")
        raise OSError(errno.ENETUNREACH, f"test cluster: {{host}} is not loopback")

    sys.addaudithook(_loopback_only)
'''


# above Ray's worker ports (10002-19999) and its Ray Client servers' (23000-23999), below the
# kernel's ephemeral ones
PORTS = range(24000, 32000)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a listener Ray starts later (GCS, dashboard, Ray Client,
    agents). Drawn outside the kernel's ephemeral range (32768+), where every port Ray lets the
    OS choose comes from, so a port picked now cannot be taken by those in the meantime; and clear
    of Ray's worker ports, the ports of its Ray Client servers and its fixed defaults (6379, 8265,
    10001)."""
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.choice(PORTS)
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {PORTS}")


def pin_this_process() -> None:
    """The in-process driver's share of the sitecustomize patch (call before ``ray.init``)."""
    import ray._private.services as services

    services.node_ip_address_from_perspective = lambda *args, **kwargs: LOOPBACK


def marked_processes(key: str, value: str) -> list[int]:
    """The live processes whose environment has ``key=value`` (from /proc)."""
    mark = f"{key}={value}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if mark in environ.split(b"\0") and alive(int(entry.name)):
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for ``pids`` to exit; the ones still alive."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@dataclass
class Node:
    """One ``ray start --block`` process and what the cluster said about it once registered.
    Every process of the node (raylet, GCS, agents, workers, even reparented ones) carries
    ``NODE_MARK=<temp_dir>`` in its environment: that is how they are found, safely by PID."""
    name: str
    process: subprocess.Popen
    temp_dir: Path
    log: Path
    resources: dict
    node_id: Optional[str] = None
    killed: bool = False

    def tail(self, size: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-size:] if self.log.exists() else ""

    def pids(self) -> list[int]:
        """The live processes of this node."""
        return marked_processes(NODE_MARK, str(self.temp_dir))

    def running(self, title: str) -> bool:
        """Whether a worker of this node is running ``title`` (Ray's process title, ``ray::f``)."""
        return any(cmdline(p).startswith(title) for p in self.pids())


class RayCluster:
    """A Ray cluster of ``ray start`` processes on 127.0.0.1 under ``root`` (keep it short: Ray's
    Unix socket paths live there and are limited to ~107 characters).

    ``env`` is the environment for a driver process (``mmcurate run``, ``ray job submit``): this
    process's environment plus the loopback pin, the cluster's token, ``node_env`` and
    ``RAY_ADDRESS`` (so that ``address: auto`` means this cluster even when other Ray instances
    run on the machine). ``node_env`` (extra variables, e.g. the S3 endpoint and credentials)
    goes to every node process, and so to every Ray worker and to the drivers that the head's
    job manager starts.
    """

    def __init__(self, root: Path, node_env: Optional[dict] = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.site = self.root / "site"
        self.site.mkdir(exist_ok=True)
        (self.site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.net_log = self.root / "refused.log"  # what the sitecustomize refused to reach
        self.token = uuid.uuid4().hex
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.client_port = free_port()
        self.address = f"{LOOPBACK}:{self.gcs_port}"
        self.dashboard_url = f"http://{LOOPBACK}:{self.dashboard_port}"
        self.client_address = f"ray://{LOOPBACK}:{self.client_port}"
        self.nodes: list[Node] = []        # the nodes started and not stopped or killed
        self.head: Optional[Node] = None
        self._node_env = dict(node_env or {})
        self._count = 0

    # -- environments ------------------------------------------------------------------------------
    def _base_env(self) -> dict:
        env = dict(os.environ)
        for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
            env.pop(key, None)  # the pytest process may have pinned a private Ray of its own
        env.update({
            PIN_FLAG: "1",
            NET_LOG: str(self.net_log),
            "PYTHONPATH": os.pathsep.join([str(self.site), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
        })
        return env

    @property
    def env(self) -> dict:
        env = self._base_env()
        env.update(self._node_env)
        env["RAY_ADDRESS"] = self.address
        return env

    def _node_process_env(self) -> dict:
        env = self._base_env()
        # The GCS notices a killed node in ~3 s instead of ~15 s (its raylet refuses the health
        # check at once); a live but busy raylet still has 3 x 10 s to answer.
        env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
        # A stopped node drains at most 2 s (Ray's default waits up to 30 s for every lease to
        # come back, which detached actors, Ray Data's for one, never do).
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "2"
        env.update(self._node_env)
        return env

    # -- nodes -------------------------------------------------------------------------------------
    def _start(self, args: list[str], num_cpus: int, num_gpus: int, resources: Optional[dict]) -> Node:
        self._count += 1
        name = f"n{self._count}"
        temp_dir = self.root / name
        log = self.root / f"{name}.log"
        cmd = [RAY, "start", "--block", "--disable-usage-stats", f"--node-ip-address={LOOPBACK}",
               f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
               f"--resources={json.dumps(resources or {})}",
               f"--object-store-memory={300 * 1024 * 1024}",
               # several nodes on one host: let the OS pick every per-node port
               "--min-worker-port=0", "--max-worker-port=0", "--node-manager-port=0",
               "--object-manager-port=0", f"--dashboard-agent-listen-port={free_port()}",
               "--log-style=record", "--log-color=false"] + args
        with open(log, "wb") as out:
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=dict(self._node_process_env(), **{NODE_MARK: str(temp_dir)}),
                                       cwd=self.root)
        node = Node(name, process, temp_dir, log, dict(resources or {}))
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: int = 2, resources: Optional[dict] = None, wait: bool = True,
                   timeout: float = 60) -> Node:
        """The head: GCS on ``address``, dashboard (job submission) on ``dashboard_url``, Ray
        Client server on ``client_address``. ``wait=False`` returns once the GCS accepts
        connections, so that worker nodes can start while the head finishes (``wait_ready``)."""
        assert self.head is None
        self.head = self._start(["--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                                 f"--dashboard-host={LOOPBACK}", f"--dashboard-port={self.dashboard_port}",
                                 f"--ray-client-server-port={self.client_port}"], num_cpus, 0, resources)
        if wait:
            self.wait_ready([self.head], timeout)
        else:
            deadline = time.monotonic() + timeout
            while not self._gcs_listening():
                self._check_running(self.head)
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the GCS did not listen within {timeout:.0f} s:\n{self.head.tail()}")
                time.sleep(0.2)
        return self.head

    def add_node(self, num_cpus: int = 1, num_gpus: int = 0, resources: Optional[dict] = None,
                 wait: bool = True, timeout: float = 60) -> Node:
        """A worker node joining the head; with ``wait``, returns once the GCS lists it alive
        (``node.node_id`` set). Give it a unique custom resource to place work on it."""
        assert self.head is not None, "start_head first"
        node = self._start([f"--address={self.address}"], num_cpus, num_gpus, resources)
        if wait:
            self.wait_ready([node], timeout)
        return node

    def gcs_nodes(self) -> list[dict]:
        """The GCS's node table (alive and dead), read by a child process (no client kept here)."""
        return _node_table(self.address, self.env)

    def _check_running(self, node: Node) -> None:
        if node.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"ray start for {node.name} exited with {node.process.returncode}:\n{node.tail()}")

    def wait_ready(self, nodes: list[Node], timeout: float = 60) -> None:
        """Wait until each ``ray start`` says its node runs, then find the nodes in the GCS's table
        by their temp dirs: set ``node_id``; every one must be registered as 127.0.0.1."""
        deadline = time.monotonic() + timeout
        for node in nodes:
            while "Ray runtime started" not in node.tail():
                self._check_running(node)
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{node.name} did not start within {timeout:.0f} s:\n{node.tail()}")
                time.sleep(0.2)
        while True:
            try:
                table = {e["temp_dir"]: e for e in self.gcs_nodes() if e["alive"]}
            except (RuntimeError, subprocess.TimeoutExpired):
                table = {}
            if all(str(n.temp_dir) in table for n in nodes):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nodes {[n.name for n in nodes]} not registered within {timeout:.0f} s: {table}")
            time.sleep(0.5)
        for node in nodes:
            entry = table[str(node.temp_dir)]
            if entry["address"] != LOOPBACK:
                self.stop()
                raise RuntimeError(f"{node.name} registered as {entry['address']}, not {LOOPBACK}: the loopback "
                                   "pin (sitecustomize) did not take")
            node.node_id = entry["node_id"]

    def _gcs_listening(self) -> bool:
        try:
            socket.create_connection((LOOPBACK, self.gcs_port), timeout=1).close()
            return True
        except OSError:
            return False

    def wait_for_nodes(self, n: int, timeout: float = 60) -> list[dict]:
        """Wait until ``n`` nodes are alive; every one must report 127.0.0.1."""
        deadline = time.monotonic() + timeout
        while True:
            table = [e for e in self.gcs_nodes() if e["alive"]]
            if len(table) == n:
                wrong = [e for e in table if e["address"] != LOOPBACK]
                if wrong:
                    raise RuntimeError(f"nodes not on {LOOPBACK}: {wrong}")
                return table
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(table)} nodes alive, wanted {n}: {table}")
            time.sleep(0.5)

    def kill_node(self, node: Node, wait: bool = True) -> list[int]:
        """SIGKILL every process of the node at once (``ray start``, raylet, agents, its workers),
        by PID: a machine dying. With ``wait``, returns once the GCS has declared it dead.
        Returns the PIDs killed."""
        pids = node.pids()
        kill_pids(pids)
        node.killed = True
        for _ in range(3):  # a worker the raylet was forking as it died
            if not wait_gone(pids, 10):
                break
            pids = node.pids()
            kill_pids(pids)
        node.process.wait(10)
        still = node.pids()
        assert not still, f"processes of {node.name} survived SIGKILL: {still}"
        self._gone(node, wait)
        return pids

    def stop_node(self, node: Node, timeout: float = 30, wait: bool = True) -> None:
        """SIGTERM the ``ray start --block`` process (it stops its children), then SIGKILL by PID
        whatever of the node is left. With ``wait``, returns once the GCS lists it dead."""
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
            try:
                node.process.wait(timeout)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(10)
        left = node.pids()
        if left:
            wait_gone(left, 5)
            kill_pids(node.pids())
            wait_gone(left, 10)
        self._gone(node, wait and node is not self.head)

    def _gone(self, node: Node, wait: bool, timeout: float = 60) -> None:
        if node in self.nodes:
            self.nodes.remove(node)
        if node is self.head:
            self.head = None
        deadline = time.monotonic() + timeout
        while wait and node.node_id is not None:
            if not any(e["node_id"] == node.node_id and e["alive"] for e in self.gcs_nodes()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the GCS still lists {node.name} alive {timeout:.0f} s after it went")
            time.sleep(0.5)

    def stop(self) -> None:
        """Every node (by PID), worker nodes first, then the head."""
        for node in [n for n in self.nodes if n is not self.head] + ([self.head] if self.head else []):
            self.stop_node(node, wait=False)

    def logs(self, pattern: str, size: int = 3000) -> str:
        """The tails of the nodes' Ray log files named like ``pattern`` (for failure messages)."""
        out = []
        for path in sorted(self.root.glob(f"n*/session_latest/logs/{pattern}")):
            text = path.read_text(errors="replace")[-size:]
            out.append(f"--- {path.relative_to(self.root)}\n{text}")
        return "\n".join(out)

    # Ray's dashboard looks for a cloud it runs on and reports "usage stats disabled" home, with
    # usage stats disabled too: the sitecustomize refuses those, and they are all it may refuse.
    RAY_PROBES = {"169.254.169.254", "metadata.google.internal", "usage-stats.ray.io"}

    def refused(self) -> list[str]:
        """``pid argv event host`` of every connection or lookup beyond loopback that a process of
        this cluster or one of its drivers tried (and the sitecustomize refused)."""
        return self.net_log.read_text().splitlines() if self.net_log.exists() else []

    def unexpected_refusals(self) -> list[str]:
        """The refusals other than the dashboard's cloud and usage probes."""
        return [line for line in self.refused()
                if not ("ray/dashboard/dashboard.py" in line and line.rsplit(" ", 1)[-1] in self.RAY_PROBES)]

    def pids(self) -> set[int]:
        """Every process of this cluster alive now."""
        return {p for node in self.nodes for p in node.pids()}


_NODE_TABLE = r"""
import json, sys
import ray._private.services  # noqa: F401  (patched by the sitecustomize)
from ray._raylet import GcsClient
client = GcsClient(address=sys.argv[1])
out = []
for node_id, info in client.get_all_node_info(timeout=5).items():
    out.append({"node_id": node_id.hex(), "alive": info.state == 0, "address": info.node_manager_address,
                "temp_dir": info.temp_dir,
                "resources": dict(info.resources_total)})
print(json.dumps(out))
"""


def _node_table(address: str, env: dict) -> list[dict]:
    """The GCS's node table, read in a child process so this one keeps no GCS client."""
    done = subprocess.run([sys.executable, "-c", _NODE_TABLE, address], env=env, capture_output=True,
                          timeout=30, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout)


def short_root(prefix: str = "rc") -> Path:
    """A fresh directory under /tmp with a short name (for Ray's Unix socket paths)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
