"""`TrainerPool`: megatron-core rank processes kept for a session and reused by `MegatronTrainer.train`.

A launch pays python start-up, torch and megatron imports and the process-group rendezvous, most
of a short run's time. A pool keeps one group of ranks per rank environment (interpreter, device,
world size, every environment variable but the rendezvous port and pytest's current test name) and
sends each run to it (the least recently used group closes when a new one would pass `max_groups`); the rank
builds the run afresh (model, optimizer, every global state megatron-core keeps, every RNG:
megatron_worker.fresh_globals) with the code a fresh process runs. tests/trainers/test_trainer_pool.py
shows pooled runs equal fresh-process runs bit for bit, and that a planted leak would be caught.
Ranks die with the session (ownership.py), and a group whose run fails is killed, never reused.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from pytest_miles.placement.ownership import spawn
from pytest_miles.placement.processes import PORT_RACE_TRIES, port_race_lost
from pytest_miles.trainers.session import close_ranks, send_to_ranks, wait_for_reply

# What may differ between runs of one group: the rendezvous port (each start draws one) and the test
# pytest names while it runs (PYTEST_CURRENT_TEST changes with every test; nothing in a rank reads it).
NOT_IN_KEY = frozenset({"MASTER_PORT", "PYTEST_CURRENT_TEST"})


def pool_refusal(trainer) -> str | None:
    """Why `trainer`'s runs launch fresh ranks instead (None: the pool takes them)."""
    if trainer.launcher is not None:
        return "ranks placed as Ray actors"
    if trainer.transformer_impl != "local":
        return "TransformerEngine keeps global state of its own (FP8 recipes, workspaces)"
    if trainer.device == "cuda" and trainer.gpu_lease is not None:
        return "GPUs leased per run under pytest-xdist"
    return None


class _Group:
    """One group of pooled ranks, started for one rank environment."""

    def __init__(self, trainer, env: dict[str, str], log_dir: Path) -> None:
        self.world, self.timeout = trainer.world, trainer.timeout
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"rank{r}.log" for r in range(self.world)]
        self.runs = 0
        self.procs: list[subprocess.Popen] = []
        try:
            for rank in range(self.world):
                with open(self.logs[rank], "ab") as f:
                    self.procs.append(spawn(  # dies with pytest, however it dies (ownership.py)
                        [trainer.python, "-m", "pytest_miles.trainers.pool_rank", trainer.device],
                        stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                        env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
        except BaseException:
            self.close()
            raise

    def send(self, cmd: dict) -> None:
        send_to_ranks(self.procs, self.logs, (json.dumps(cmd) + "\n").encode(), "pooled megatron rank")

    def run(self, spec_path: Path, result: Path, timeout: float) -> int:
        """Train the run of `spec_path`; which run in these processes it was (1: the first)."""
        self.runs += 1
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
        self.started = 0

    def _group(self, trainer, env: dict[str, str]) -> tuple[tuple, _Group]:
        """The group for `trainer`'s rank environment `env` (its port aside), started if none is up."""
        key = (trainer.python, trainer.device, trainer.world,
               tuple(sorted((k, v) for k, v in env.items() if k not in NOT_IN_KEY)))
        if key in self.groups:
            self.groups[key] = self.groups.pop(key)  # now the most recently used
            return key, self.groups[key]
        while len(self.groups) >= self.max_groups:  # idle ranks hold memory (a CUDA context on GPUs)
            self.groups.pop(next(iter(self.groups))).close()
        self.started += 1
        self.groups[key] = _Group(trainer, env, self.log_dir / f"group-{self.started}")
        return key, self.groups[key]

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
        for g in groups:
            g.close()

    def __enter__(self) -> TrainerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
