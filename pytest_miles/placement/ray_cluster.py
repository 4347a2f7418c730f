"""`RayCluster`: the user's Ray cluster, or a local head started (and later stopped) for the session.

A local head is a real `ray start --head` subprocess; `add_node` adds real raylets (a second
machine, as far as Ray's scheduler is concerned). Only what this object started is ever stopped."""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pytest_miles.errors import ClusterError, Unavailable  # noqa: F401  (importable here too)
from pytest_miles.facts.environment import restore_env
from pytest_miles.placement.ownership import disown, disown_dir, own_dir, spawn
from pytest_miles.placement.processes import exited, free_port, kill_marked, kill_tree, tail
from pytest_miles.placement.signals import ensure as ensure_signals
from pytest_miles.placement.signals import ray_init

# Ray puts unix sockets under <temp>/session_<date>_<pid>/sockets/: ~60 characters after <temp>,
# and a socket path may not exceed 107 bytes.
_MAX_TEMP_DIR = 40


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    ip: str
    resources: dict[str, float] = field(default_factory=dict)
    is_head: bool = False

    @property
    def gpus(self) -> int:
        return int(self.resources.get("GPU", 0))

    @property
    def label(self) -> str:
        custom = sorted(k for k in self.resources
                        if k not in ("CPU", "GPU", "memory", "object_store_memory", "accelerator_type")
                        and not k.startswith(("node:", "accelerator_type:")))
        extra = f", {', '.join(custom)}" if custom else ""
        return f"node {self.node_id[:8]} ({self.ip}{', head' if self.is_head else ''}{extra})"


# Ports Ray's other components take by default (dashboard, its agent, client server, metrics,
# GCS): seen as "dashboard_agent_http is trying to use a port number 52365 that is used by other
# components" when the free port we picked for the GCS was one of them.
MARKER = "PYTEST_MILES_RAY_HEAD"  # environment entry of every process of a head this session started

RAY_DEFAULT_PORTS = frozenset({6379, 8076, 8265, 10001, 52365, 52366, 62365})


def _ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("Ray is not installed (pip install 'pytest-miles[ray]')") from None
    return ray


def _split_address(address: str) -> tuple[str, int] | None:
    addr = address.split("://", 1)[-1]
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _reachable(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection opens, else why not."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def _listens_in_tree(pid: int, port: int) -> bool | None:
    """Whether a process of `pid`'s tree listens on TCP `port`; None when that cannot be read."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    for p in procs:
        try:
            conns = p.net_connections(kind="tcp")
        except psutil.AccessDenied:
            return None
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns):
            return True
    return False


_PROBE = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, namespace="pytest-miles-probe")
ray.shutdown()
"""


def _probe_gcs(address: str, timeout: float) -> str | None:
    """None when a driver can connect to `address`, else why not. In a subprocess, killed at
    `timeout`: `ray.init()` waits without bound on a live port that is not a Ray GCS."""
    from pytest_miles.placement.ownership import spawn

    proc = spawn([sys.executable, "-c", _PROBE, address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                 stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid, timeout=2)
        proc.wait(timeout=5)
        return "ray.init() did not connect (is that port a Ray GCS?)"
    finally:
        disown(proc.pid)
    if proc.returncode != 0:
        lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else f"the probe {exited(proc.returncode)}"
    return None


class RayCluster:
    """Connected (`connect`) or started (`start_local`) Ray cluster; `shutdown()` is idempotent."""

    def __init__(self, address: str, *, started: bool, timeout: float) -> None:
        self.address, self.started, self.timeout = address, started, timeout
        self._procs: list[tuple[subprocess.Popen, Path]] = []
        self._temp_dir: Path | None = None
        self._remove_temp = False
        self._saved_env: dict[str, str | None] = {}
        self._connected = False  # set before ray.init: a signal inside it still gets ray.shutdown()
        self._marker = secrets.token_hex(8)  # in the environment of every process of the head

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def connect(cls, address: str, *, timeout: float = 60.0, source: str = "--miles-ray-address") -> RayCluster:
        """Attach to a running cluster. An address that does not answer fails within `timeout`."""
        ray = _ray()
        hostport = _split_address(address)
        if address != "auto":
            if hostport is None:
                raise ClusterError(f"{source} {address!r}: expected host:port of the Ray GCS (or 'auto')")
            why = _reachable(*hostport, timeout=min(timeout, 10.0))
            if why is not None:
                raise ClusterError(f"{source} {address!r}: cannot reach the Ray GCS ({why}); is the head running "
                                   f"(`ray start --head --port {hostport[1]}`)?")
        why = _probe_gcs(address, timeout)
        if why is not None:
            raise ClusterError(f"{source} {address!r}: no Ray cluster answered within {timeout:g} s "
                               f"(--miles-ray-timeout): {why}")
        cluster = cls(address, started=False, timeout=timeout)
        cluster._connected = True
        try:
            ray_init(ray.init, address=address, log_to_driver=False, namespace="pytest-miles")
        except BaseException as exc:  # ConnectionError, RuntimeError: ray's own words; or a stop signal
            cluster.shutdown()
            if not isinstance(exc, Exception):
                raise
            raise ClusterError(f"{source} {address!r}: Ray refused the connection: {exc}") from None
        ensure_signals()
        return cluster

    @classmethod
    def start_local(cls, temp_root: str | Path | None = None, *, num_cpus: int = 2, timeout: float = 60.0,
                    object_store_bytes: int = 100 * 2**20) -> RayCluster:
        """Start a head (`ray start --head --block`) owned by this object, and connect to it."""
        ray = _ray()
        if ray.is_initialized():
            raise ClusterError("Ray is already initialised in this process (ray.init() was called outside "
                               "pytest-miles); pass its address with --miles-ray-address instead")
        cluster = cls("", started=True, timeout=timeout)
        atexit.register(cluster.shutdown)  # the head has a session of its own: a crashed script must not leak it
        cluster._prepare_temp(temp_root)
        cluster._set_env(cluster._auth_env())
        try:
            cluster._start_head(num_cpus, object_store_bytes)
            cluster._connected = True
            ray_init(ray.init, address=cluster.address, log_to_driver=False, namespace="pytest-miles")
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    def _start_head(self, num_cpus: int, object_store_bytes: int, attempts: int = 3) -> None:
        """`ray start --head` on a free port. The port is free when picked, not when Ray binds it: a
        concurrent session can take it in between (seen with several heads starting at once), and
        the head then exits before opening it. Such a head is started again on another port."""
        for attempt in range(attempts):
            port = free_port()
            while port in RAY_DEFAULT_PORTS:  # `ray start` refuses a GCS on one ("used by other components")
                port = free_port()
            self.address = f"127.0.0.1:{port}"
            self._spawn("head", ["--head", f"--port={port}", "--include-dashboard=false"], num_cpus,
                        object_store_bytes, {})
            proc, _ = self._procs[-1]
            try:
                if self._wait_port(port):
                    return
                if attempt == attempts - 1:
                    raise ClusterError(f"port {port} of the Ray head answers from a process outside the head, "
                                       f"{attempts} times over (ports taken by concurrent sessions)")
            except ClusterError:
                if attempt == attempts - 1 or proc.poll() is None:
                    raise
            kill_tree(proc.pid)  # exited before opening its port, or the port is somebody else's
            self._procs.pop()

    # ---- nodes -------------------------------------------------------------------------------

    def nodes(self) -> list[NodeInfo]:
        ray = _ray()
        out = []
        for n in ray.nodes():
            if n.get("Alive"):
                res = dict(n.get("Resources") or {})
                out.append(NodeInfo(n["NodeID"], n.get("NodeManagerAddress", "?"), res,
                                    is_head="node:__internal_head__" in res))
        out.sort(key=lambda n: (not n.is_head, n.node_id))
        return out

    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes())

    def add_node(self, *, num_cpus: int = 1, resources: dict[str, float] | None = None,
                 env: dict[str, str] | None = None, object_store_bytes: int = 100 * 2**20) -> NodeInfo:
        """Start another raylet (`ray start --address`) on this machine with its own resources and
        environment; returns it once the cluster lists it. Only on a cluster this object started."""
        if not self.started:
            raise ClusterError(f"add_node: the cluster at {self.address} was not started by pytest-miles; "
                               "add nodes to it with `ray start --address` on those machines")
        before = {n.node_id for n in self.nodes()}
        args = [f"--address={self.address}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        self._spawn(f"node{len(self._procs)}", args, num_cpus, object_store_bytes, env or {})
        proc, log = self._procs[-1]
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            new = [n for n in self.nodes() if n.node_id not in before]
            if new:
                proc.miles_node_id = new[0].node_id  # type: ignore[attr-defined]  (for remove_node)
                return new[0]
            if proc.poll() is not None:
                raise ClusterError(f"ray start --address {self.address} {exited(proc.returncode)}:\n"
                                   f"{tail(log)}")
            time.sleep(0.2)
        raise ClusterError(f"the new node did not join {self.address} within {self.timeout:g} s:\n{tail(log)}")

    def remove_node(self, node: NodeInfo) -> None:
        """Stop a raylet add_node() started and wait (bounded) until the cluster no longer lists it,
        so a test's extra node does not leak into later tests."""
        for i, (proc, _) in enumerate(self._procs):
            if i > 0 and getattr(proc, "miles_node_id", None) == node.node_id:
                if proc.poll() is None:
                    kill_tree(proc.pid, timeout=5)
                    proc.wait(timeout=10)
                del self._procs[i]
                break
        else:
            raise ClusterError(f"remove_node: node {node.node_id[:8]} was not added by this pytest-miles cluster")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and any(n.node_id == node.node_id for n in self.nodes()):
            time.sleep(0.2)

    def require(self, *, gpus: int = 0) -> None:
        """Unavailable (the calling test skips, naming what the cluster has) when it lacks what it needs."""
        have = self.gpus()
        if have < gpus:
            where = ", ".join(f"{n.label}: {n.gpus} GPU" for n in self.nodes())
            raise Unavailable(f"requires {gpus} GPU(s) on the Ray cluster at {self.address}; it has {have} ({where})")

    # ---- teardown ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Disconnect the driver first (Ray's own exit hook would otherwise wait without bound on a
        GCS we killed), then stop the head's processes, then any process still carrying its marker
        (a worker the raylet started while it was being stopped)."""
        ray = sys.modules.get("ray")
        if self._connected and ray is not None:
            self._connected = False
            ray.shutdown()
        for proc, _ in reversed(self._procs):
            if proc.poll() is None:
                kill_tree(proc.pid, timeout=5)
                proc.wait(timeout=10)
        if self._procs:
            kill_marked(MARKER, self._marker)
        for proc, _ in self._procs:
            disown(proc.pid)
        self._procs.clear()
        restore_env(self._saved_env)
        if self._remove_temp and self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            disown_dir(self._temp_dir)
            self._remove_temp = False

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def pids(self) -> list[int]:
        """Processes this object started (the `ray start` launchers), for leak checks."""
        return [p.pid for p, _ in self._procs]

    # ---- internals ---------------------------------------------------------------------------

    def _prepare_temp(self, temp_root: str | Path | None) -> None:
        if temp_root is not None and len(str(Path(temp_root).resolve() / "ray")) <= _MAX_TEMP_DIR:
            self._temp_dir = Path(temp_root).resolve() / "ray"
            self._temp_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="miles-ray-", dir="/tmp"))
            self._remove_temp = True
            own_dir(self._temp_dir)  # removed by the watchdog if this process is killed

    @staticmethod
    def _auth_env() -> dict[str, str]:
        """Token auth stays on when the user asked for it, with a token kept in memory (Ray would
        otherwise write one to ~/.ray/auth_token); otherwise it is off explicitly."""
        if os.environ.get("RAY_AUTH_MODE") == "token":
            if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
                return {}
            return {"RAY_AUTH_TOKEN": secrets.token_hex(32)}
        return {"RAY_AUTH_MODE": "disabled"}

    def _set_env(self, env: dict[str, str]) -> None:
        env = {"RAY_USAGE_STATS_ENABLED": "0", **env}
        for key, value in env.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def _spawn(self, name: str, args: list[str], num_cpus: int, object_store_bytes: int,
               env: dict[str, str]) -> None:
        ray_cli = Path(sys.executable).with_name("ray")
        cmd = [str(ray_cli)] if ray_cli.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
        cmd += ["start", "--block", *args, f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_bytes}",
                "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={self._temp_dir}"]
        log = self._temp_dir / f"{name}.log"
        # No drain on SIGTERM (`ray start` waits up to 30 s for Serve proxies by default): nothing
        # of ours serves traffic, and the session must end promptly when it is stopped.
        env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **env, MARKER: self._marker}
        with open(log, "wb") as f:
            proc = spawn(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self._procs.append((proc, log))

    def _wait_port(self, port: int) -> bool:
        """Until a process of our head's tree listens on `port` (True). A port that answers from
        another process (a concurrent session took it after we picked it): False."""
        proc, log = self._procs[0]
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ClusterError(f"ray start --head {exited(proc.returncode)}:\n{tail(log)}")
            if _reachable("127.0.0.1", port, timeout=1.0) is None:
                return _listens_in_tree(proc.pid, port) is not False  # None: unreadable here, taken as ours
            time.sleep(0.2)
        raise ClusterError(f"the Ray head did not open port {port} within {self.timeout:g} s:\n{tail(log)}")
