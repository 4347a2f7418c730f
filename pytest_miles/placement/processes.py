"""Processes that never hang and never outlive their owner: free ports, log tails, tree kills."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


PORT_RACE_TRIES = 3  # starts of processes that bind a port picked by free_port(), when another process took it


def port_race_lost(logs) -> bool:
    """A process failed because the port picked for it by free_port() was taken in between (EADDRINUSE
    in its log: another process got the free port first, a race on a busy machine): worth a start on a
    new port."""
    return any(log_contains(log, "EADDRINUSE") for log in logs)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def tail(path: str | Path | None, lines: int = 40) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def exited(returncode: int | None) -> str:
    """How a child ended, in words: "exited with code N", or for a negative code (Popen: killed by that
    signal) "was killed by SIGKILL (signal 9)", which the log cannot say about itself."""
    if returncode is None or returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return f"was killed by signal {-returncode}"
    why = ("; the OOM killer, or a process killing its own tree after a child died, as SGLang does: see the "
           "log's last lines" if name == "SIGKILL" else "")
    return f"was killed by {name} (signal {-returncode}{why})"


def log_contains(path: str | Path, marker: str, since: int = 0) -> bool:
    """Whether a log file holds `marker` after byte offset `since` (False while it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(since)
            return marker.encode() in f.read()
    except OSError:
        return False


# Executables a kernel JIT runs as child processes: FlashInfer and TorchInductor (ninja, nvcc and the host
# compiler), Triton (ptxas), DeepGEMM (nvcc). A server whose descendants run one of them is compiling.
COMPILERS = frozenset({"ninja", "nvcc", "cicc", "ptxas", "nvlink", "fatbinary", "cudafe++", "cc1plus", "cc1",
                       "c++", "g++", "gcc", "clang", "clang++", "ld", "as", "collect2"})


def compilers_running(pid: int | None) -> list[str]:
    """Names of the kernel compilers (COMPILERS) among the descendants of `pid`, sorted; [] where there
    is no such process or no psutil."""
    if not pid:
        return []
    try:
        import psutil

        kids = psutil.Process(pid).children(recursive=True)
    except Exception:  # gone, no permission, no psutil: nothing seen
        return []
    seen = set()
    for k in kids:
        try:
            name = k.name()
        except Exception:
            continue
        if name in COMPILERS:
            seen.add(name)
    return sorted(seen)


def kill_tree(pid: int, timeout: float = 10.0) -> list[int]:
    """SIGTERM the process and all its descendants, then SIGKILL what is left. Returns the pids."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = [root]
    try:  # a process group of its own (start_new_session) catches grandchildren that reparented
        pgid = os.getpgid(pid)
        if pgid == pid:
            os.killpg(pgid, signal.SIGTERM)
            os.killpg(pgid, signal.SIGCONT)
    except (ProcessLookupError, PermissionError):
        pass
    for p in procs:
        try:
            p.terminate()
            p.resume()  # a stopped (SIGSTOP'd, wedged) process acts on SIGTERM only once continued
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return [p.pid for p in procs]


def kill_marked(key: str, value: str, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process whose environment has `key=value` (a tree's processes wherever they
    were reparented or whatever session they started); returns their pids once gone (bounded)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE and p.environ().get(key) == value:
                p.kill()
                found.append(p)
        except psutil.Error:
            continue
    psutil.wait_procs(found, timeout=timeout)
    return [p.pid for p in found]


def wait_until(predicate, timeout: float, interval: float = 0.5, alive=None) -> bool:
    """Poll predicate until true or timeout; stop early (False) when alive() turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if alive is not None and not alive():
            return False
        time.sleep(interval)
    return False


def die_with_parent() -> None:  # pragma: no cover  (runs in the child, before exec)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
