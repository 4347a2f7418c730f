"""`MegatronTrainer`: a real megatron-core training run in worker processes, one per rank.

The launcher never hangs: every rank has a deadline, a rank that dies takes the others down,
and errors carry the failing rank's log tail. Teardown kills the whole process tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pytest_miles.errors import InputError, TrainerError
from pytest_miles.facts.environment import deterministic_env_vars
from pytest_miles.placement.ownership import disown, spawn
from pytest_miles.placement.processes import PORT_RACE_TRIES, free_port, kill_tree, port_race_lost, tail
from pytest_miles.recording import stage
from pytest_miles.trainers.config import ModelArgs, TrainerConfig, config_from
from pytest_miles.trainers.pool import pool_refusal

__all__ = ["MegatronTrainer", "ModelArgs", "Run", "TrainerConfig", "TrainerError", "wait_for_ranks"]


@dataclass
class Run:
    losses: list[float]
    grad_norms: list[float]
    checkpoints: list[str]
    first_step: int
    loss_bits: list[str] = field(default_factory=list)
    grad_norm_bits: list[str] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    save_dir: str | None = None
    seconds: float = 0.0
    device: str = "cpu"
    facts: dict = field(default_factory=dict)  # what ran (TE: versions, recipe, attention backend selected)
    process_run: int = 1  # which run in its rank processes (1: started for it; > 1: pooled ranks reused, pool.py)
    pid: int | None = None  # rank 0's process id (two runs with one pid shared their processes)

    def checkpoint(self, step: int | None = None) -> Path:
        """The iter_XXXXXXX dir saved at `step` (default: the last one)."""
        if not self.checkpoints:
            raise TrainerError("this run saved no checkpoint (pass save_steps and save_dir)")
        if step is None:
            return Path(self.checkpoints[-1])
        for c in self.checkpoints:
            if c.endswith(f"iter_{step:07d}"):
                return Path(c)
        raise TrainerError(f"no checkpoint at step {step}; saved: {', '.join(Path(c).name for c in self.checkpoints)}")


def wait_for_ranks(poll, logs: list[Path], timeout: float, error=TrainerError, where=lambda rank: "") -> None:
    """Until every rank exited 0; the first rank that exits non-zero, or the deadline, raises
    `error` with that rank's (or rank 0's) log tail. `poll()` -> exit codes (None: running)."""
    deadline = time.monotonic() + timeout
    while True:
        codes = poll()
        failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            r, c = failed[0]
            raise error(f"megatron rank {r}{where(r)} exited with code {c} (log {logs[r]}):\n{tail(logs[r])}")
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            raise error(f"megatron run did not finish within {timeout:g} s; rank 0 log tail:\n{tail(logs[0])}")
        time.sleep(0.2)


class MegatronTrainer:
    """Launches megatron-core ranks for one `TrainerConfig`. Takes the config's fields as keywords
    (`MegatronTrainer(seed=1, tensor_parallel=2)`), or `config=TrainerConfig(...)` (keywords given
    beside it replace its fields); what it runs with and on: `launcher`, `gpu_lease`, `hardware`, and
    `pool` (a TrainerPool: runs go to rank processes kept for the session where it takes them)."""

    name = "megatron"

    def __init__(self, *, config: TrainerConfig | None = None, launcher=None, gpu_lease=None, hardware=None,
                 pool=None, **fields: Any) -> None:
        try:  # validated once, in the config, before any rank starts
            cfg = config_from(config, fields)
        except InputError as exc:
            raise TrainerError(str(exc)) from None
        from pytest_miles.trainers.te_model import check_te_machine, rank_env

        # refused before any rank starts
        check_te_machine(cfg.transformer_impl, cfg.resolved_precision, cfg.device, hardware)
        self.config = cfg
        self.transformer_impl = cfg.transformer_impl
        self.precision, self.attention_backend = cfg.resolved_precision, cfg.resolved_attention_backend
        self.seed, self.model, self.tp, self.world = cfg.seed, cfg.model, cfg.tensor_parallel, cfg.world
        # (iteration, data_seed): from that iteration on, draw the tokens with data_seed (a run that departs)
        self.data_seed_from_step = list(cfg.data_seed_from_step) if cfg.data_seed_from_step else None
        self.device, self.lr, self.mbs = cfg.device, cfg.lr, cfg.micro_batch_size
        self.deterministic = cfg.deterministic
        self.timeout, self.python = cfg.timeout, cfg.python
        self.extra_env = {**rank_env(self.precision), **(cfg.env or {})}
        self.log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix="miles-trainer-"))
        self.launches = 0
        # launcher: None (local subprocesses) or a RayRankLauncher (one Ray actor per rank);
        # gpu_lease: (n, owner) -> Lease, so that xdist workers never train on one GPU together.
        self.launcher, self.gpu_lease = launcher, gpu_lease
        self.pool = pool

    def train(self, steps: int, *, save_dir: str | Path | None = None, save_steps: list[int] | None = None,
              load_dir: str | Path | None = None) -> Run:
        from pytest_miles.validation import check_train_args

        try:
            check_train_args(steps, save_dir=save_dir, save_steps=save_steps, load_dir=load_dir)
        except ValueError as exc:
            raise TrainerError(str(exc)) from None
        if save_dir is not None:
            save_dir = Path(save_dir)
            try:
                save_dir.mkdir(parents=True, exist_ok=True)
                probe = save_dir / ".miles-write-probe"
                probe.write_text("")
                probe.unlink()
            except OSError as exc:
                raise TrainerError(f"save_dir {save_dir}: not writable ({exc.strerror or exc})") from None
        if load_dir is not None and not (Path(load_dir) / "latest_checkpointed_iteration.txt").exists():
            raise TrainerError(f"load_dir {load_dir}: no latest_checkpointed_iteration.txt, nothing to resume from")
        save_steps = sorted(save_steps if save_steps is not None else ([steps] if save_dir else []))
        self.launches += 1
        run_dir = self.log_dir / f"launch-{self.launches}"
        run_dir.mkdir(parents=True, exist_ok=True)
        spec = {**self.spec(), "steps": steps,
                "save_dir": str(save_dir) if save_dir else None, "save_steps": save_steps,
                "load_dir": str(load_dir) if load_dir else None, "result": str(run_dir / "result.json"),
                "data_seed_from_step": self.data_seed_from_step}
        (run_dir / "spec.json").write_text(json.dumps(spec))
        # trainers made by one factory share log_dir (and count launches from 1): a result left by an
        # earlier trainer's launch must never stand in for this one's
        (run_dir / "result.json").unlink(missing_ok=True)
        t0 = time.monotonic()
        process_run = 1
        pooled = self.pool is not None and pool_refusal(self) is None
        with stage(f"megatron-core run {self.launches}: {self.world} rank(s) on {self.device}, {steps} step(s), "
                   f"{'pooled' if pooled else 'fresh'} ranks (logs {run_dir})"):
            if pooled:
                process_run = self.pool.run(self, run_dir / "spec.json", run_dir / "result.json")
            else:
                self._launch(run_dir)
        try:
            result = json.loads((run_dir / "result.json").read_text())
        except (OSError, ValueError) as exc:
            raise TrainerError(f"rank 0 wrote no result ({exc}); log tail:\n{tail(run_dir / 'rank0.log')}") from None
        return Run(save_dir=str(save_dir) if save_dir else None, seconds=time.monotonic() - t0,
                   process_run=process_run, **result)

    def _launch(self, run_dir: Path) -> None:
        argv = ["-m", "pytest_miles.trainers.megatron_worker", str(run_dir / "spec.json")]
        if self.launcher is not None:
            self.launcher.launch(world=self.world, gpus_per_rank=1 if self.device == "cuda" else 0, argv=argv,
                                 extra_env=self.extra_env, run_dir=run_dir, timeout=self.timeout, error=TrainerError)
            return
        if self.device == "cuda" and self.gpu_lease is not None:
            with self.gpu_lease(self.world, f"megatron run ({self.world} rank(s))") as lease:
                return self._launch_local(run_dir, argv, lease.env)
        return self._launch_local(run_dir, argv, {})

    def rank_env(self, lease_env: dict[str, str]) -> dict[str, str]:
        """The environment every rank shares (deterministic env, rendezvous, one BLAS thread)."""
        return {**os.environ, **deterministic_env_vars(), **self.extra_env, **lease_env, "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(self.world), "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def spec(self) -> dict:
        """What every rank builds from (the run's own fields are added by the caller)."""
        return {"seed": self.seed, "model": asdict(self.model), "tensor_parallel": self.tp, "device": self.device,
                "lr": self.lr, "micro_batch_size": self.mbs, "deterministic": self.deterministic,
                "transformer_impl": self.transformer_impl, "precision": self.precision,
                "attention_backend": self.attention_backend}

    def session(self, **kwargs):
        """Ranks that stay up and take one command at a time (the RL loop's trainer): see
        `pytest_miles.trainers.session.MegatronSession`."""
        from pytest_miles.trainers.session import MegatronSession

        return MegatronSession(self, **kwargs)

    def _launch_local(self, run_dir: Path, argv: list[str], lease_env: dict[str, str]) -> None:
        for left in range(PORT_RACE_TRIES - 1, -1, -1):
            try:
                return self._launch_once(run_dir, argv, lease_env)
            except TrainerError:
                if not left or not port_race_lost([run_dir / f"rank{r}.log" for r in range(self.world)]):
                    raise

    def _launch_once(self, run_dir: Path, argv: list[str], lease_env: dict[str, str]) -> None:
        base = self.rank_env(lease_env)
        procs: list[tuple[int, subprocess.Popen, Path]] = []
        try:
            for rank in range(self.world):
                log = run_dir / f"rank{rank}.log"
                env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                with open(log, "wb") as f:
                    procs.append((rank, spawn([self.python, *argv], stdout=f, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, env=env), log))
            wait_for_ranks(lambda: [p.poll() for _, p, _ in procs], [log for _, _, log in procs], self.timeout,
                           TrainerError)
        finally:
            for _, p, _ in procs:
                if p.poll() is None:
                    kill_tree(p.pid)
                    p.wait(timeout=10)
                disown(p.pid)
