"""`LoopFactory`: whole loops from the engine factory and a trainer maker (what the
`rl_loop_factory` fixture hands out; plain scripts build one directly)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pytest_miles.checks.loop_record import LoopRun
from pytest_miles.models.embedded import TinyConfig, write_hf_checkpoint
from pytest_miles.scenarios.loop.run import LoopConfig, run_loop


def weights_dtype(engine: str) -> str:
    """fp32 weights for the embedded engines (same dtype as the trainer); bf16 for SGLang."""
    return "bfloat16" if engine.startswith("sglang") else "float32"


@dataclass(frozen=True)
class LoopSetup:
    """The loop's configuration on one engine kind (`LoopFactory.setup`)."""

    engine_kind: str
    shape: TinyConfig  # the embedded model the loop starts from
    init: Path  # its HF checkpoint in the engine's dtype (what both sides load first)
    weights_dtype: str  # what the trainer exports for the engine at every sync
    trainer: dict[str, Any]  # make_trainer(**trainer): seed, model (ModelArgs), deterministic; the local spec, fp32
    engine: dict[str, Any]  # engine_factory(engine_kind, **engine): model, deterministic, ...

    @property
    def hf_config(self) -> dict[str, Any]:
        return asdict(self.shape)


class LoopFactory:
    def __init__(self, *, engine_factory: Callable[..., Any], make_trainer: Callable[..., Any], work_root: str | Path,
                 model: TinyConfig | None = None, shared_root: str | Path | None = None) -> None:
        self.engine_factory, self.make_trainer = engine_factory, make_trainer
        self.work_root, self.model = Path(work_root), model or TinyConfig()
        self.shared_root = Path(shared_root) if shared_root else self.work_root
        self.runs = 0

    def shared(self, key: str, **kwargs: Any) -> LoopRun:
        """The run `self(**kwargs)`, made once per key for the whole pytest run, across
        pytest-xdist workers (the first worker runs it under a file lock, the others read its
        records; the artefact paths stay valid for the run)."""
        from filelock import FileLock

        if not key.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"shared run key {key!r}: letters, digits, - and _ only")
        path = self.shared_root / f"rl-loop-{key}.json"
        with FileLock(str(path) + ".lock", timeout=900):
            if path.exists():
                return LoopRun.from_json(json.loads(path.read_text()))
            run = self(**kwargs)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(run.to_json()))
            tmp.replace(path)
            return run

    def init_weights(self, engine: str) -> Path:
        """The embedded model as the loop's starting point, written once per dtype."""
        dtype = weights_dtype(engine)
        path = self.work_root / f"init-{dtype}"
        if not (path / "config.json").exists():
            write_hf_checkpoint(path, self.model, dtype=dtype)
        return path

    def setup(self, engine: str = "reference", *, seed: int = 1234, engine_deterministic: bool = True,
              trainer_deterministic: bool = True) -> LoopSetup:
        """What a loop on `engine` runs with, before anything starts: the trainer's and the engine
        factory's keywords and the initial weights (written here once). The loop itself uses it, so
        a test that measures on "the loop's configuration" takes it from here."""
        from pytest_miles.trainers.config import ModelArgs

        init = self.init_weights(engine)
        # the embedded reference engine rotates pairs (2i, 2i+1); SGLang HF's halves
        args = ModelArgs.qwen2(self.model, rotary_interleaved=engine.startswith("reference"))
        opts = {"threads": 1} if engine == "reference-server" else {}
        return LoopSetup(
            engine_kind=engine,
            shape=self.model,
            init=init,
            weights_dtype=weights_dtype(engine),
            trainer={"seed": seed, "model": args, "deterministic": trainer_deterministic},
            engine={"model": str(init), "deterministic": engine_deterministic, **opts},
        )

    def _engine(self, engine: str, init: Path, deterministic: bool, opts: dict[str, Any]):
        """The loop's engine: the engine factory lends a live engine of the same configuration whose
        model differs from `init` in its weights only (its own weights are put back after the loop),
        else starts one; a plain callable engine factory is called."""
        lend = getattr(self.engine_factory, "lend", None)
        if lend is not None:
            return lend(engine, model=str(init), deterministic=deterministic, **opts)
        return contextlib.nullcontext(self.engine_factory(engine, model=str(init), deterministic=deterministic,
                                                          **opts))

    def __call__(self, engine: str = "reference", *, trainer: str = "megatron", iterations: int = 3, seed: int = 1234,
                 prompts: list[list[int]] | None = None, n_prompts: int = 4, n_samples: int = 4,
                 max_new_tokens: int = 12, engine_deterministic: bool = True, trainer_deterministic: bool = True,
                 stop_after: int | None = None, name: str | None = None) -> LoopRun:
        """One loop of `iterations`; with `stop_after=k` it stops after iteration k, closes the
        trainer and the engine, and resumes from the saved checkpoint with an engine restarted
        from the saved weights (resume equivalence)."""
        if trainer != "megatron":
            raise ValueError(f"trainer {trainer!r}: expected megatron (the only trainer pytest-miles runs)")
        if iterations < 1:
            raise ValueError(f"iterations: {iterations} < 1")
        if stop_after is not None and not 1 <= stop_after < iterations:
            raise ValueError(f"stop_after: {stop_after}, expected 1 <= stop_after < iterations ({iterations})")
        self.runs += 1
        name = name or f"loop{self.runs}"
        work = self.work_root / f"{self.runs:02d}-{name}"
        init = self.init_weights(engine)
        cfg = LoopConfig(seed=seed, n_prompts=len(prompts) if prompts else n_prompts, n_samples=n_samples,
                         max_new_tokens=max_new_tokens, vocab_size=self.model.vocab_size,
                         prompts=tuple(map(tuple, prompts)) if prompts else None, weights_dtype=weights_dtype(engine))
        setup = self.setup(engine, seed=seed, engine_deterministic=engine_deterministic,
                           trainer_deterministic=trainer_deterministic)
        trainer = self.make_trainer(**setup.trainer)
        hf = setup.hf_config
        opts = {k: v for k, v in setup.engine.items() if k not in ("model", "deterministic")}
        threads = 1 if engine == "reference" else None  # CPU engines run single-threaded (run.host_threads)
        records = []
        with self._engine(engine, init, engine_deterministic, opts) as eng:
            eng.update_weights_from_disk(init)  # a reused engine may hold another run's weights
            with trainer.session(init_hf=init, hf_config=hf) as session:
                records += run_loop(eng, session, cfg, work, 1, stop_after or iterations, threads)
        notes = []
        if stop_after is not None:
            # another configuration (the saved weights): the factory closes the live engine first
            eng = self.engine_factory(engine, model=records[-1].weights, deterministic=engine_deterministic, **opts)
            with trainer.session(load_dir=work / "checkpoints", hf_config=hf) as session:
                records += run_loop(eng, session, cfg, work, stop_after + 1, iterations, threads)
            notes.append(f"stopped after iteration {stop_after}; resumed from {work / 'checkpoints'} with the engine "
                         f"restarted from {records[stop_after - 1].weights}")
        run = LoopRun(name, records, engine, str(work), notes)
        (work / "loop.json").write_text(json.dumps(run.to_json(), indent=1))  # for a look after the fact
        return run
