"""`TrainerPool`: megatron-core rank processes kept for a session and reused by `MegatronTrainer.train`.

A launch pays python start-up, torch and megatron imports and the process-group rendezvous, most
of a short run's time. A pool keeps one group of ranks per rank environment (interpreter, device,
world size, every environment variable but the rendezvous port and pytest's current test name) and
sends each run to it (the least recently used group closes when a new one would pass `max_groups`); the rank
builds the run afresh (model, optimizer, every global state megatron-core keeps, every RNG:
megatron_worker.fresh_globals) with the code a fresh process runs. tests/trainers/test_trainer_pool.py
shows pooled runs equal fresh-process runs bit for bit, and that a planted leak would be caught.
Ranks die with the session (ownership.py), and a group whose run fails is killed, never reused.

`prestart` starts a run group in the background (the suite does at session start, beside its engines),
and `prestart_sessions` spares for `MegatronSession`s: rank processes that imported what a rank builds
with and joined their process group, each handed to one session (then its own, as a fresh session's
ranks are; never back to the pool). The wait for a background start and the start itself are stages of
the report ("waiting for ..., started in the background"; "starting ... in the background").
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from pytest_miles.errors import TrainerError
from pytest_miles.placement.ownership import spawn
from pytest_miles.placement.processes import PORT_RACE_TRIES, exited, port_race_lost, tail
from pytest_miles.recording import note_stage, stage
from pytest_miles.trainers.session import close_ranks, send_to_ranks, wait_for_reply

# What may differ between runs of one group: the rendezvous port (each start draws one), the test pytest
# names while it runs (PYTEST_CURRENT_TEST changes with every test; nothing in a rank reads it), and what
# libraries in the pytest process set in its environment for themselves as a session goes on, which no
# rank reads for anything it computes: Ray's driver (RAY_CLIENT_MODE on import, PYTHONBREAKPOINT for its
# debugger at ray.init), our Ray cluster's own settings (RAY_AUTH_MODE, RAY_USAGE_STATS_ENABLED;
# placement/ray_cluster.py) and torch's Inductor cache folder (TORCHINDUCTOR_CACHE_DIR, set to its
# default at first use; a cache location). Seen on the suite's CPU run: its Ray checks came between the
# background start of the training tests' group and their first run, and no run found its group.
NOT_IN_KEY = frozenset({"MASTER_PORT", "PYTEST_CURRENT_TEST", "RAY_CLIENT_MODE", "PYTHONBREAKPOINT", "RAY_AUTH_MODE",
                        "RAY_USAGE_STATS_ENABLED", "TORCHINDUCTOR_CACHE_DIR"})


def pool_refusal(trainer) -> str | None:
    """Why `trainer`'s runs launch fresh ranks instead (None: the pool takes them)."""
    if trainer.launcher is not None:
        return "ranks placed as Ray actors"
    if trainer.transformer_impl != "local":
        return "TransformerEngine keeps global state of its own (FP8 recipes, workspaces)"
    if trainer.device == "cuda" and trainer.gpu_lease is not None:
        return "GPUs leased per run under pytest-xdist"
    return None


def session_refusal(trainer) -> str | None:
    """Why `trainer`'s sessions start their own ranks instead of a spare's (None: a spare may serve
    them). TransformerEngine is no reason: a spare has built nothing before its session."""
    if trainer.launcher is not None:
        return "ranks placed as Ray actors"
    if trainer.device == "cuda" and trainer.gpu_lease is not None:
        return "GPUs leased per session under pytest-xdist"
    return None


def rank_key(trainer, env: dict[str, str]) -> tuple:
    """What a group of ranks is started for: interpreter, device, world size and the rank environment
    (NOT_IN_KEY aside: the rendezvous port, pytest's current test, what libraries set for themselves)."""
    return (trainer.python, trainer.device, trainer.world,
            tuple(sorted((k, v) for k, v in env.items() if k not in NOT_IN_KEY)))


class _Group:
    """One group of pooled ranks, started for one rank environment (`background`: ahead of its first
    use, which then waits for it under a stage of its own)."""

    def __init__(self, trainer, env: dict[str, str], log_dir: Path, background: bool = False) -> None:
        self.world, self.timeout, self.background = trainer.world, trainer.timeout, background
        self.label = f"megatron-core ranks ({self.world} on {trainer.device}, logs {log_dir})"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"rank{r}.log" for r in range(self.world)]
        self.ready = log_dir / "ready"
        self.ready.mkdir(exist_ok=True)
        self.runs = 0
        self.procs: list[subprocess.Popen] = []
        self.started = time.time()  # wall clock, as the ready files' times
        try:
            for rank in range(self.world):
                with open(self.logs[rank], "ab") as f:
                    self.procs.append(spawn(  # dies with pytest, however it dies (ownership.py)
                        [trainer.python, "-m", "pytest_miles.trainers.pool_rank", trainer.device, str(self.ready)],
                        stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                        env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
        except BaseException:
            self.close()
            raise

    def _await(self, timeout: float) -> None:
        """A background start: wait until every rank is ready (a stage), then note how long the start
        took; TrainerError naming a rank that exits first, or says nothing within `timeout`."""
        files = [self.ready / f"rank{r}" for r in range(self.world)]
        deadline = time.monotonic() + timeout
        with stage(f"waiting for {self.label}, started in the background"):
            while not all(f.exists() for f in files):
                for r, p in enumerate(self.procs):
                    if p.poll() is not None:
                        raise TrainerError(f"pooled megatron rank {r} {exited(p.returncode)} while starting in the "
                                           f"background (log {self.logs[r]}):\n{tail(self.logs[r])}")
                if time.monotonic() > deadline:
                    raise TrainerError(f"{self.label}, started in the background, not ready within {timeout:g} s; "
                                       f"rank 0 log tail:\n{tail(self.logs[0])}")
                time.sleep(0.05)
        note_stage(f"starting {self.label} in the background",
                   max(f.stat().st_mtime for f in files) - self.started)
        self.background = False

    def send(self, cmd: dict) -> None:
        send_to_ranks(self.procs, self.logs, (json.dumps(cmd) + "\n").encode(), "pooled megatron rank")

    def hand_over(self, spec_path: Path, timeout: float) -> tuple[list[subprocess.Popen], list[Path]]:
        """A spare's ranks, turned into the ranks of the session of `spec_path`: theirs from now on."""
        if self.background:
            self._await(timeout)
        self.send({"session": str(spec_path)})
        procs, self.procs = self.procs, []
        return procs, self.logs

    def run(self, spec_path: Path, result: Path, timeout: float) -> int:
        """Train the run of `spec_path`; which run in these processes it was (1: the first)."""
        self.runs += 1
        if self.background:
            self._await(timeout)
        self.send({"run": self.runs, "spec": str(spec_path)})
        wait_for_reply(result, self.procs, self.logs, time.monotonic() + timeout, "pooled megatron rank",
                       f"in run {self.runs} of its processes",
                       f"megatron run did not finish within {timeout:g} s (pooled ranks, run {self.runs} in them)",
                       poll=0.05)
        return self.runs

    def close(self) -> None:
        procs, self.procs = self.procs, []
        close_ranks(procs)


class TrainerPool:
    """Rank groups kept for a session, one per rank environment; `close()` ends them all."""

    def __init__(self, log_dir: str | Path, max_groups: int = 2) -> None:
        if not isinstance(max_groups, int) or isinstance(max_groups, bool) or max_groups < 1:
            raise ValueError(f"TrainerPool(max_groups=): {max_groups!r} is not accepted; expected an integer >= 1")
        self.log_dir, self.max_groups = Path(log_dir), max_groups
        self.groups: dict[tuple, _Group] = {}  # least recently used first
        self.spares: dict[tuple, list[_Group]] = {}  # per rank environment, oldest first
        self.started = 0

    def _group(self, trainer, env: dict[str, str], background: bool = False) -> tuple[tuple, _Group]:
        """The group for `trainer`'s rank environment `env` (its port aside), started if none is up."""
        key = rank_key(trainer, env)
        if key in self.groups:
            self.groups[key] = self.groups.pop(key)  # now the most recently used
            return key, self.groups[key]
        while len(self.groups) >= self.max_groups:  # idle ranks hold memory (a CUDA context on GPUs)
            self.groups.pop(next(iter(self.groups))).close()
        self.started += 1
        self.groups[key] = _Group(trainer, env, self.log_dir / f"group-{self.started}", background)
        return key, self.groups[key]

    def prestart(self, trainer) -> str | None:
        """Start the group `trainer`'s runs will go to, in the background (nothing if one is up, or if
        the pool does not take its runs); what it started, for the report, or None."""
        env = trainer.rank_env({})
        if pool_refusal(trainer) is not None or rank_key(trainer, env) in self.groups:
            return None
        return self._group(trainer, env, background=True)[1].label

    def prestart_sessions(self, trainer, count: int = 1) -> list[str]:
        """Start `count` spares for `trainer`'s sessions in the background (none where
        `session_refusal` says why); what it started, for the report."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"prestart_sessions(count=): {count!r} is not accepted; expected an integer >= 0")
        if session_refusal(trainer) is not None:
            return []
        labels = []
        for _ in range(count):
            env = trainer.rank_env({})
            self.started += 1
            spare = _Group(trainer, env, self.log_dir / f"session-spare-{self.started}", background=True)
            self.spares.setdefault(rank_key(trainer, env), []).append(spare)
            labels.append(spare.label)
        return labels

    def take_session(self, trainer, env: dict[str, str]) -> _Group | None:
        """A spare for a session of `trainer` with rank environment `env` (its port aside), now the
        caller's (`_Group.hand_over`); None if none was started for that environment."""
        if session_refusal(trainer) is not None:
            return None
        stock = self.spares.get(rank_key(trainer, env))
        return stock.pop(0) if stock else None

    def run(self, trainer, spec_path: Path, result: Path) -> int:
        """Train the run of `spec_path` on pooled ranks for `trainer`'s environment (started on
        first use); which run in those processes it was. A failed run kills its group."""
        for left in range(PORT_RACE_TRIES - 1, -1, -1):
            key, group = self._group(trainer, trainer.rank_env({}))
            try:
                return group.run(spec_path, result, trainer.timeout)
            except BaseException:
                del self.groups[key]
                group.close()
                if not (left and group.runs == 1 and port_race_lost(group.logs)):
                    raise  # a race for the free port at the group's start: a new group, a new port
        raise AssertionError("unreachable")

    def plant(self, trainer, seed: int) -> None:
        """The negative control's leak, left in the group `trainer`'s runs go to (started if needed)."""
        self._group(trainer, trainer.rank_env({}))[1].send({"plant": seed})

    def close(self) -> None:
        groups, self.groups = list(self.groups.values()), {}
        groups += [g for stock in self.spares.values() for g in stock]
        self.spares = {}
        for g in groups:
            g.close()

    def __enter__(self) -> TrainerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
