"""GPU leases for pytest-xdist: each worker starts its engines and trainers on GPUs no other worker holds.

One `flock`ed file per GPU, released by the kernel when the holder dies, so a crashed worker never
strands a GPU; a worker that finds too few free GPUs waits (bounded). Details: docs/cluster.md."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pytest_miles._xdist import worker_id
from pytest_miles.errors import LeaseError  # noqa: F401  (importable here too)


def _try_lock(path: Path) -> int | None:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int) -> None:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def visible_tokens(count: int, environ: dict[str, str] | None = None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES entries of this process's GPUs (its own list, or 0..count-1)."""
    env = os.environ if environ is None else environ
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is not None and raw.strip() != "":
        return [t.strip() for t in raw.split(",") if t.strip()][:count]
    return [str(i) for i in range(count)]


@dataclass
class Lease:
    devices: list[str]
    owner: str
    _leaser: GpuLeaser | None = field(default=None, repr=False)
    since: float = field(default_factory=time.time)  # when it was granted (wall clock)

    @property
    def env(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.devices)}

    def release(self) -> None:
        if self._leaser is not None:
            self._leaser._release(self)
            self._leaser = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class GpuLeaser:
    """Per process; `acquire(n)` returns a Lease of n devices (blocking up to `timeout` seconds)."""

    def __init__(self, root: str | Path, devices: list[str], *, timeout: float = 900.0, poll: float = 0.5,
                 who: str | None = None) -> None:
        self.root, self.devices, self.timeout, self.poll = Path(root), list(devices), timeout, poll
        self.who = who or worker_id() or "main"
        self.root.mkdir(parents=True, exist_ok=True)
        self._held: dict[str, list[int]] = {}  # device -> [fd of its lock, leases of this process on it]
        self._mutex = threading.Lock()

    def _path(self, device: str) -> Path:
        return self.root / f"gpu-{device.replace('/', '_')}.lock"

    def holders(self) -> dict[str, str]:
        out = {}
        for d in self.devices:
            info = self._path(d).with_suffix(".owner")
            try:
                o = json.loads(info.read_text())
                out[d] = f"worker {o['worker']} (pid {o['pid']}) for {o['owner'] or 'a lease'}"
            except (OSError, ValueError, KeyError, TypeError):
                out[d] = "unknown holder"
        return out

    def acquire(self, n: int = 1, owner: str = "") -> Lease:
        """n devices no other process holds. Devices this process already holds come first: one
        worker's engines and trainers share its GPUs (colocated, as in Miles), never another's."""
        if not isinstance(n, int) or n < 1:
            raise LeaseError(f"{owner or 'a lease'}: n={n!r}; expected an integer >= 1 GPU")
        if n > len(self.devices):
            raise LeaseError(f"{owner or 'a lease'} needs {n} GPU(s); this machine has {len(self.devices)} "
                             f"({', '.join(self.devices) or 'none'})")
        deadline = time.monotonic() + self.timeout
        while True:
            with self._mutex:
                got = [d for d in self.devices if d in self._held][:n]
                fresh: list[tuple[str, int]] = []
                for d in self.devices:
                    if len(got) + len(fresh) == n:
                        break
                    if d in self._held:
                        continue
                    fd = _try_lock(self._path(d))
                    if fd is not None:
                        fresh.append((d, fd))
                if len(got) + len(fresh) == n:
                    for d in got:
                        self._held[d][1] += 1
                    for d, fd in fresh:
                        self._held[d] = [fd, 1]
                    got += [d for d, _ in fresh]
                    break
                for _, fd in fresh:  # all or nothing, so two workers never deadlock half-way
                    _unlock(fd)
            if time.monotonic() > deadline:
                held = ", ".join(f"GPU {d}: {w}" for d, w in self.holders().items())
                raise LeaseError(f"{self.who}: no {n} free GPU(s) for {owner or 'a lease'} within {self.timeout:g} s "
                                 f"(held: {held}); run fewer xdist workers than GPUs, or raise "
                                 f"--miles-gpu-lease-timeout")
            time.sleep(self.poll)
        for d, _ in fresh:
            info = {"worker": self.who, "pid": os.getpid(), "owner": owner, "since": time.time()}
            self._path(d).with_suffix(".owner").write_text(json.dumps(info))
        return Lease(got, owner, self)

    def _release(self, lease: Lease) -> None:
        with self._mutex:
            for d in lease.devices:
                entry = self._held.get(d)
                if entry is None:
                    continue
                entry[1] -= 1
                if entry[1] == 0:
                    _unlock(entry[0])
                    del self._held[d]
