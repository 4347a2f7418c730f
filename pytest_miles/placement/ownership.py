"""Process trees bound to the pytest process that started them, however it dies.

Two mechanisms, each covering what the other cannot: the kernel's parent-death signal, and a tiny
watchdog process that kills every owned tree when pytest's end of a pipe closes. `spawn()` is the
one way the plugin starts a process tree; `disown()` once it closed normally. See docs/cluster.md."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from pytest_miles._xdist import is_worker

TAG = "PYTEST_MILES_OWNER"  # in the environment of every process of an owned tree
_PR_SET_PDEATHSIG = 1
_GRACE = 2.0  # seconds between SIGTERM and SIGKILL when the owner is gone

_lock = threading.Lock()
_watchdog: _Watchdog | None = None


def _libc() -> Any:
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - not Linux
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:  # runs in the child between fork and exec: no allocation, no locks
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class _Watchdog:
    def __init__(self, watch: list[int]) -> None:
        r, self._w = os.pipe()  # the write end is non-inheritable: only this process holds it
        self.owner = os.getpid()
        self.tag = f"{self.owner}-{time.time_ns()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_miles.placement.ownership", str(self.owner), self.tag, *map(str, watch)],
            stdin=r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={k: v for k, v in os.environ.items() if k != TAG})
        os.close(r)

    def send(self, line: str) -> None:
        try:
            os.write(self._w, (line + "\n").encode())
        except OSError:  # the watchdog is gone: the parent-death signal still covers direct children
            pass


def _current() -> _Watchdog | None:
    """The watchdog of this process (started on first use; a forked child starts its own)."""
    global _watchdog
    if not sys.platform.startswith("linux"):
        return None
    with _lock:
        if _watchdog is None or _watchdog.owner != os.getpid():
            watch = []
            if is_worker():  # the controller: its death ends this worker's trees
                watch.append(os.getppid())
            try:
                _watchdog = _Watchdog(watch)
            except OSError:
                return None
        return _watchdog


def watchdog_pid() -> int | None:
    """The pid of this process's watchdog (it lives as long as this process: not a leak)."""
    wd = _watchdog
    return wd.proc.pid if wd is not None and wd.owner == os.getpid() else None


def owner_tag() -> dict[str, str]:
    """The environment entry that marks a process as part of this process's owned trees."""
    wd = _current()
    return {TAG: wd.tag} if wd is not None else {}


def spawn(cmd: list[str], *, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen:
    """Popen in a session of its own, tagged, dying with this process (however it dies)."""
    env = {**(os.environ if env is None else env), **owner_tag()}
    if _LIBC is not None and threading.current_thread() is threading.main_thread():
        # PDEATHSIG fires when the creating *thread* exits: only safe from the main thread.
        kwargs.setdefault("preexec_fn", _die_with_parent)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, **kwargs)
    adopt(proc.pid)
    return proc


def adopt(pid: int) -> None:
    wd = _current()
    if wd is not None:
        wd.send(f"+{pid}")


def disown(pid: int) -> None:
    """The tree of `pid` was closed normally: the watchdog forgets it."""
    if _watchdog is not None and _watchdog.owner == os.getpid():
        _watchdog.send(f"-{pid}")


def own_dir(path: str | os.PathLike) -> None:
    """A temporary folder the watchdog removes (after killing the trees) if this process dies first."""
    wd = _current()
    if wd is not None and "\n" not in str(path):
        wd.send(f"d{os.fspath(path)}")


def disown_dir(path: str | os.PathLike) -> None:
    """The folder was removed (or is kept) normally: the watchdog forgets it."""
    if _watchdog is not None and _watchdog.owner == os.getpid():
        _watchdog.send(f"u{os.fspath(path)}")


# ---- the watchdog process ---------------------------------------------------------------------


def _tree(psutil: Any, roots: dict[int, float]) -> dict[int, float]:
    out = {}
    for pid, created in roots.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() != created:
                continue
            out[pid] = created
            for c in p.children(recursive=True):
                out[c.pid] = c.create_time()
        except psutil.Error:
            continue
    return out


def _sweep(psutil: Any, tag: str, roots: dict[int, float], known: dict[int, float], sids: set[int]) -> list:
    """Every live process of the owned trees."""
    me = os.getpid()
    found = {}
    for pid, created in {**known, **_tree(psutil, roots)}.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:
                found[pid] = p
        except psutil.Error:
            continue
    for p in psutil.process_iter():
        if p.pid == me or p.pid in found:
            continue
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if os.getsid(p.pid) in sids or p.environ().get(TAG) == tag:
                found[p.pid] = p
        except (psutil.Error, OSError):
            continue
    return list(found.values())


def _dead(psutil: Any, p: Any) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE  # killed; its parent has not reaped it yet
    except psutil.Error:
        return True


def _wait(psutil: Any, procs: list, timeout: float) -> list:
    """Those of `procs` still running after up to `timeout` s (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if not _dead(psutil, p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if not _dead(psutil, p)]
    return alive


def _own_sessions(psutil: Any, roots: dict[int, float]) -> set[int]:
    """The session ids of the owned roots (each was spawned as a session leader). A root that is gone
    still names its session (orphans may live on in it), unless its pid now belongs to another process:
    Linux frees a pid only when no process uses it as a session id any more, so a reused pid means no
    member of our session is left, and that number is somebody else's session (seen: a concurrent
    test's megatron rank, started in its own session with the recycled pid, killed by this sweep)."""
    out = set()
    for pid, created in roots.items():
        try:
            if psutil.Process(pid).create_time() != created:
                continue
        except psutil.NoSuchProcess:
            pass
        except psutil.Error:
            continue
        out.add(pid)
    return out


def _kill_all(psutil: Any, tag: str, roots: dict[int, float], known: dict[int, float],
              also: list | None = None) -> None:
    for sig, wait in ((signal.SIGTERM, _GRACE), (signal.SIGKILL, 3.0), (signal.SIGKILL, 2.0)):
        sids = _own_sessions(psutil, roots)
        procs = [p for p in _sweep(psutil, tag, roots, known, sids) + (also or []) if not _dead(psutil, p)]
        if not procs:
            return
        for p in procs:
            try:
                p.send_signal(sig)
                if sig == signal.SIGTERM:
                    p.resume()  # a stopped process acts on SIGTERM only once continued
            except psutil.Error:
                pass
        _wait(psutil, procs, wait)


def _serve(owner: int, tag: str, watch: list[int]) -> None:
    import select

    import psutil

    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # only the owner's death ends this process
    watched = {}
    for pid in [owner, *watch]:
        try:
            watched[pid] = psutil.Process(pid).create_time()
        except psutil.Error:
            watched[pid] = -1.0
    roots: dict[int, float] = {}
    known: dict[int, float] = {}
    dirs: set[str] = set()
    buf = b""
    last_snapshot = 0.0
    controller_died = False

    def gone(pid: int, created: float) -> bool:
        try:
            return created < 0 or psutil.Process(pid).create_time() != created or \
                psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    while True:
        ready, _, _ = select.select([0], [], [], 0.2)
        if ready:
            chunk = os.read(0, 4096)
            if not chunk:
                break  # the owner died (or exited): its pipe end closed
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").strip()
                if text[:1] in ("d", "u") and text[1:].startswith("/"):
                    (dirs.add if text[0] == "d" else dirs.discard)(text[1:])
                    continue
                if not text[1:].isdigit():
                    continue
                pid = int(text[1:])
                if text[0] == "+":
                    try:
                        roots[pid] = psutil.Process(pid).create_time()
                    except psutil.Error:
                        continue
                else:
                    roots.pop(pid, None)
                    known = {p: c for p, c in known.items() if p in _tree(psutil, roots)}
        if gone(owner, watched[owner]):
            break
        if any(gone(p, c) for p, c in watched.items() if p != owner):
            controller_died = True
            break
        if time.monotonic() - last_snapshot > 0.5:
            known.update(_tree(psutil, roots))
            last_snapshot = time.monotonic()
    if roots or known:
        known.update(_tree(psutil, roots))
    also = []
    if controller_died:  # an xdist worker must not outlive its controller: it goes with its trees
        try:
            also.append(psutil.Process(owner))
        except psutil.Error:
            pass
    if roots or known or also:
        _kill_all(psutil, tag, roots, known, also)
    for path in dirs:  # after the kill: nothing writes there any more
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2], [int(a) for a in sys.argv[3:]])
