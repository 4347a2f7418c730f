"""`MegatronTrainer`: a real megatron-core training run in worker processes, one per rank.

The launcher never hangs: every rank has a deadline, a rank that dies takes the others down,
and errors carry the failing rank's log tail. Teardown kills the whole process tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pytest_miles.errors import TrainerError  # noqa: F401  (importable here too)
from pytest_miles.facts.environment import deterministic_env_vars
from pytest_miles.placement.ownership import disown, spawn
from pytest_miles.placement.processes import free_port, kill_tree, tail


@dataclass(frozen=True)
class ModelArgs:
    """Mirrors Miles' MODEL_ARGS for the tiny default (learned absolute positions)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = 2
    ffn_hidden_size: int | None = 128
    vocab_size: int = 512
    seq_length: int = 32
    dropout: float = 0.0
    position_embedding_type: str = "learned_absolute"
    # The Qwen2 architecture (`ModelArgs.qwen2`) sets these; the defaults are the tiny GPT above.
    normalization: str = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    swiglu: bool = False
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    kv_channels: int | None = None
    rotary_base: float = 10000.0
    rotary_interleaved: bool = False
    tie_embeddings: bool = False

    @classmethod
    def qwen2(cls, cfg, *, seq_length: int | None = None, rotary_interleaved: bool = False) -> ModelArgs:
        """The same architecture as an HF Qwen2 config (a `TinyConfig`): RMSNorm, SwiGLU, GQA,
        bias on q/k/v only, RoPE, tied embeddings per config. On CPU megatron-core's RoPE runs
        through the worker's host subclass. `rotary_interleaved`: pairs (2i, 2i+1) rotate together
        (GPT-J style, what the embedded reference engine computes) instead of HF's halves."""
        return cls(num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                   num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_key_value_heads,
                   ffn_hidden_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                   seq_length=seq_length or cfg.max_position_embeddings, position_embedding_type="rope",
                   normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps, swiglu=True, add_bias_linear=False,
                   add_qkv_bias=True, kv_channels=cfg.head_dim, rotary_base=cfg.rope_theta,
                   rotary_interleaved=rotary_interleaved, tie_embeddings=cfg.tie_word_embeddings)


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


def _data_seed_from_step(value: Any) -> list[int] | None:
    if value is None:
        return None
    if (not isinstance(value, (tuple, list)) or len(value) != 2 or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in value) or value[0] < 1):
        raise TrainerError(f"data_seed_from_step {value!r}: expected (iteration >= 1, data seed), e.g. (3, 99)")
    return [int(value[0]), int(value[1])]


class MegatronTrainer:
    name = "megatron"

    def __init__(self, *, seed: int = 1234, model: ModelArgs = ModelArgs(), tensor_parallel: int = 1,
                 world_size: int | None = None, device: str = "cpu", lr: float = 1e-3, micro_batch_size: int = 2,
                 deterministic: bool = True, timeout: float = 600.0, log_dir: str | Path | None = None,
                 python: str = sys.executable, env: dict[str, str] | None = None, launcher=None,
                 gpu_lease=None, transformer_impl: str = "local", precision: str | None = None,
                 attention_backend: str | None = None, hardware=None,
                 data_seed_from_step: tuple[int, int] | None = None) -> None:
        from pytest_miles.validation import check_trainer_args

        try:  # before any rank starts: a bad seed would otherwise surface as a rank crash 20 s later
            check_trainer_args(seed=seed, tensor_parallel=tensor_parallel, world_size=world_size, device=device, lr=lr,
                               micro_batch_size=micro_batch_size, deterministic=deterministic, timeout=timeout,
                               env=env, model=model)
        except ValueError as exc:
            raise TrainerError(str(exc)) from None
        world = world_size or tensor_parallel
        if tensor_parallel < 1 or world < 1 or world % tensor_parallel:
            raise TrainerError(f"world_size {world} is not a multiple of tensor_parallel {tensor_parallel}")
        if model.num_attention_heads % tensor_parallel or (model.num_query_groups or model.num_attention_heads) % tensor_parallel:
            raise TrainerError(f"tensor_parallel {tensor_parallel} does not divide the attention heads "
                               f"({model.num_attention_heads}) and query groups ({model.num_query_groups})")
        if device not in ("cpu", "cuda"):
            raise TrainerError(f"device {device!r}: expected cpu or cuda")
        from pytest_miles.trainers.te_model import (  # refused before any rank starts
            check_te_options,
            rank_env,
        )

        self.transformer_impl = transformer_impl
        self.precision, self.attention_backend = check_te_options(transformer_impl, precision, attention_backend,
                                                                  device, hardware)
        env = {**rank_env(self.precision), **(env or {})}
        self.seed, self.model, self.tp, self.world = seed, model, tensor_parallel, world
        # (iteration, data_seed): from that iteration on, draw the tokens with data_seed (a run that departs)
        self.data_seed_from_step = _data_seed_from_step(data_seed_from_step)
        self.device, self.lr, self.mbs, self.deterministic = device, lr, micro_batch_size, deterministic
        self.timeout, self.python, self.extra_env = timeout, python, env or {}
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="miles-trainer-"))
        self.launches = 0
        # launcher: None (local subprocesses) or a RayRankLauncher (one Ray actor per rank);
        # gpu_lease: (n, owner) -> Lease, so that xdist workers never train on one GPU together.
        self.launcher, self.gpu_lease = launcher, gpu_lease

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
        self._launch(run_dir)
        try:
            result = json.loads((run_dir / "result.json").read_text())
        except (OSError, ValueError) as exc:
            raise TrainerError(f"rank 0 wrote no result ({exc}); log tail:\n{tail(run_dir / 'rank0.log')}") from None
        return Run(save_dir=str(save_dir) if save_dir else None, seconds=time.monotonic() - t0, **result)

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
