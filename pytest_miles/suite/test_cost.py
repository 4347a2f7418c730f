"""The cost of determinism on this stack, measured in the same run as its baseline: rollout
throughput with and without deterministic inference, training step time with and without
deterministic mode, next to the seed's expected costs."""

from __future__ import annotations

import statistics
import time

from pytest_miles.engines.base import SamplingParams

from .conftest import require

SEED_COST = {"rollout": "-10% to -15% (SGLang deterministic)", "training": "-3% to -8% (Megatron deterministic mode)"}


def _throughput(engine, prompts, params, repeats: int = 3) -> float:
    engine.generate(prompts[:2], params)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.generate(prompts, params)
        times.append(time.perf_counter() - t0)
    return len(prompts) * params.max_new_tokens / statistics.median(times)


def test_rollout_cost(engine_factory, miles_settings, miles_record):
    require("torch", "torch")
    kind = miles_settings("engine")
    prompts = [[(7 * i + j) % 500 + 3 for j in range(24)] for i in range(8)]
    params = SamplingParams(temperature=1.0, max_new_tokens=16)
    det = _throughput(engine_factory(kind, deterministic=True), prompts, params)
    non = _throughput(engine_factory(kind, deterministic=False), prompts, params)
    note = "" if kind.startswith("sglang") else " (embedded engine: its invariant mode feeds one token at a time)"
    miles_record(f"cost of determinism: rollout on {kind}{note}", deterministic_tok_s=round(det, 1),
                 baseline_tok_s=round(non, 1), cost=f"{(det / non - 1) * 100:+.1f}%", seed_expects=SEED_COST["rollout"])


def test_training_cost(megatron_trainer_factory, tmp_path, miles_record):
    require("megatron.core", "megatron")
    steps = 8

    def step_time(deterministic: bool) -> float:
        run = megatron_trainer_factory(seed=1, deterministic=deterministic).train(steps)
        return statistics.median(run.step_times[2:])  # the first steps warm up

    det, non = step_time(True), step_time(False)
    miles_record("cost of determinism: megatron training step", deterministic_ms=round(det * 1e3, 2),
                 baseline_ms=round(non * 1e3, 2), cost=f"{(non / det - 1) * 100:+.1f}% throughput",
                 seed_expects=SEED_COST["training"])
