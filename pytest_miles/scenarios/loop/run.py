"""One loop iteration, as Miles runs it: roll out n samples per prompt (temperature 1, a
sampling_seed per sample derived from the seed and iteration), score them with a toy reward,
group-normalise the advantages (GRPO), train one step with the rollout logprobs as the old
policy, save a checkpoint, export HF weights and push them to the engine."""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pytest_miles.checks.checkpoints import write_manifest
from pytest_miles.checks.loop_record import LoopRecord
from pytest_miles.checks.weight_sync import assert_sync_took_effect, judge_sync, read_served
from pytest_miles.engines.base import SamplingParams


@dataclass(frozen=True)
class LoopConfig:
    seed: int = 1234
    n_prompts: int = 4
    n_samples: int = 4
    prompt_len: tuple[int, int] = (4, 10)  # inclusive range of seeded prompt lengths
    max_new_tokens: int = 12
    vocab_size: int = 512
    prompts: tuple[tuple[int, ...], ...] | None = None  # fixed prompts instead of seeded ones
    reward_every: int = 8  # the toy reward: how many response tokens are multiples of this
    weights_dtype: str = "float32"  # what the trainer exports for the engine

    def __post_init__(self) -> None:
        for name in ("n_prompts", "n_samples", "max_new_tokens", "reward_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoopConfig.{name}: {getattr(self, name)} < 1")
        if self.n_samples < 2:
            raise ValueError("LoopConfig.n_samples: GRPO needs at least 2 samples per prompt (group baseline)")
        lo, hi = self.prompt_len
        if not 1 <= lo <= hi:
            raise ValueError(f"LoopConfig.prompt_len: {self.prompt_len}, expected 1 <= low <= high")


def derived_seed(*parts: object) -> int:
    """A 31-bit seed from the parts (stable across Python versions and processes)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "big") & 0x7FFFFFFF


def prompts_for(cfg: LoopConfig, iteration: int) -> list[list[int]]:
    if cfg.prompts is not None:
        return [list(p) for p in cfg.prompts]
    rng = random.Random(derived_seed("prompts", cfg.seed, iteration))
    return [[rng.randrange(3, cfg.vocab_size) for _ in range(rng.randint(*cfg.prompt_len))]
            for _ in range(cfg.n_prompts)]


def rollout_batch(prompts: list[list[int]], seeds: list[list[int]],
                  max_new_tokens: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """One iteration's rollout as the engine gets it: one batch, each prompt once per sampling seed
    of its row (temperature 1; ignore_eos: every response max_new_tokens long on every engine, the
    embedded ones never stop). From a LoopRecord: rollout_batch(r.prompts, r.sampling_seeds, n)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"rollout_batch: {len(prompts)} prompts but {len(seeds)} rows of sampling seeds")
    batch = [list(p) for p, row in zip(prompts, seeds) for _ in row]
    params = [SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, sampling_seed=s, ignore_eos=True)
              for row in seeds for s in row]
    return batch, params


def toy_reward(tokens: list[int], every: int) -> float:
    """Deterministic and cheap: the count of response tokens that are multiples of `every`."""
    return float(sum(1 for t in tokens if t % every == 0))


def grpo_advantages(rewards: list[float]) -> list[float]:
    """(r - group mean) / (group std + 1e-6), Miles' GRPO normalisation (unbiased std, as torch)."""
    n = len(rewards)
    mean = sum(rewards) / n
    std = (sum((r - mean) ** 2 for r in rewards) / (n - 1)) ** 0.5
    return [(r - mean) / (std + 1e-6) for r in rewards]


def _manifest(path: Path, out: Path) -> dict[str, str]:
    """pytest_miles.checks' manifest (per tensor/object sha256), kept beside the run's artefacts."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return dict(json.loads(write_manifest(path, out).read_text())["entries"])


SYNC_ROWS = 512  # rows read back per tensor after each sync: every row of the embedded shapes


def checked_sync(engine, session, weights: Path, cfg: LoopConfig, iteration: int, work_dir: Path,
                 live: dict[str, dict]) -> dict:
    """Push `weights`, then prove the sync did something (checks.weight_sync): served == the
    trainer's live parameters, and changed wherever those changed. `live["before"]`: the trainer's
    parameters at the previous sync, `live["served"]` the engine's weights after it (both set here
    for the next one)."""
    from pytest_miles.engines.base import WeightNotServed

    after = session.live_hf(work_dir / "live" / f"iter_{iteration:07d}.safetensors")
    shapes = {k: tuple(v.shape) for k, v in after.items()}
    try:  # what the engine served after the last sync (a rollout changes no weight), else read now
        served_before = live.get("served") or read_served(engine, shapes, SYNC_ROWS)
    except WeightNotServed as exc:  # SGLang's Qwen2 class may answer "failed" for every name (sglang#5066)
        engine.update_weights_from_disk(weights)
        return {"iteration": iteration, "passed": False, "not_applicable": f"the engine serves no weights by name: "
                f"{exc}"}
    engine.update_weights_from_disk(weights)
    served_after = read_served(engine, shapes, SYNC_ROWS)
    report = judge_sync(iteration, live.get("before", served_before), after, served_before, served_after,
                        cfg.weights_dtype)
    live["before"], live["served"] = after, served_after
    return assert_sync_took_effect(report).to_json()


def run_iteration(engine, session, cfg: LoopConfig, iteration: int, work_dir: Path,
                  live: dict[str, dict] | None = None) -> LoopRecord:
    sec: dict[str, float] = {}
    t0 = time.perf_counter()
    prompts = prompts_for(cfg, iteration)
    seeds = [[derived_seed("sample", cfg.seed, iteration, p, s) for s in range(cfg.n_samples)]
             for p in range(len(prompts))]
    batch, params = rollout_batch(prompts, seeds, cfg.max_new_tokens)
    outs = engine.generate(batch, params)
    for i, o in enumerate(outs):
        if len(o.output_ids) != len(o.logprobs) or not o.output_ids:
            raise AssertionError(f"{getattr(engine, 'name', engine)} answered {len(o.output_ids)} token ids and "
                                 f"{len(o.logprobs)} logprobs for sample {i} of iteration {iteration}: the loop needs "
                                 "one logprob per generated token")
    n = cfg.n_samples
    tokens = [[outs[p * n + s].output_ids for s in range(n)] for p in range(len(prompts))]
    lps = [[outs[p * n + s].logprobs for s in range(n)] for p in range(len(prompts))]
    sec["rollout"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rewards = [[toy_reward(t, cfg.reward_every) for t in row] for row in tokens]
    advantages = [grpo_advantages(row) for row in rewards]
    sec["reward"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    samples = [{"tokens": prompts[p] + tokens[p][s], "prompt_len": len(prompts[p]), "advantage": advantages[p][s],
                "old_logprobs": lps[p][s]} for p in range(len(prompts)) for s in range(n) if tokens[p][s]]
    out = session.train_step(samples)
    train_bits = iter(out["logprobs"])
    train_lps = [[next(train_bits) if tokens[p][s] else [] for s in range(n)] for p in range(len(prompts))]
    diffs = [abs(float.fromhex(a) - b) for p in range(len(prompts)) for s in range(n)
             for a, b in zip(train_lps[p][s], lps[p][s])]
    ckpt = session.save(work_dir / "checkpoints", iteration)
    sec["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    weights = session.export_hf(work_dir / "weights" / f"iter_{iteration:07d}", cfg.weights_dtype)
    if live is None:
        engine.update_weights_from_disk(weights)
        sync = {}
    else:
        sync = checked_sync(engine, session, weights, cfg, iteration, work_dir, live)
    sec["weight_sync"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    record = LoopRecord(
        iteration=iteration,
        prompts=prompts,
        sampling_seeds=seeds,
        tokens=tokens,
        logprob_bits=[[[float(x).hex() for x in row] for row in group] for group in lps],
        rewards=rewards,
        advantages=advantages,
        train_logprob_bits=train_lps,
        train_rollout_logprob_abs_diff=sum(diffs) / len(diffs) if diffs else 0.0,
        loss_bits=out["loss"],
        grad_norm_bits=out["grad_norm"],
        checkpoint=str(ckpt),
        checkpoint_manifest=_manifest(ckpt, work_dir / "manifests" / f"checkpoint-{iteration:07d}.json"),
        weights=str(weights),
        weights_manifest=_manifest(weights, work_dir / "manifests" / f"weights-{iteration:07d}.json"),
        seconds=sec,
        sync=sync,
    )
    sec["manifests"] = time.perf_counter() - t0
    return record


@contextmanager
def host_threads(n: int | None):
    """torch intra-op threads for an in-process engine on the host, restored afterwards (a tiny
    model on a shared CPU spends more on thread sync than on math: 1 thread is ~30x faster)."""
    if n is None or "torch" not in sys.modules:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_loop(
    engine, session, cfg: LoopConfig, work_dir: str | Path, first: int, last: int, threads: int | None = None
) -> list[LoopRecord]:
    """Iterations first..last (1-based, inclusive) on a live engine and trainer session. The
    engine must already hold the weights iteration `first` starts from."""
    work_dir = Path(work_dir)
    if first < 1 or last < first:
        raise ValueError(f"iterations {first}..{last}: expected 1 <= first <= last")
    live: dict[str, dict] = {}  # the trainer's parameters at the last sync (checked_sync)
    with host_threads(threads):
        return [run_iteration(engine, session, cfg, it, work_dir, live) for it in range(first, last + 1)]
