"""The cost of determinism on this stack, measured in the same run as its baseline: rollout
throughput with and without deterministic inference, training step time with and without
deterministic mode, next to the costs the Miles reproducibility guide expects."""

from __future__ import annotations

import random
import statistics

from pytest_miles.capabilities.verdict import NotApplicable
from pytest_miles.engines.base import SamplingParams
from pytest_miles.scenarios.cost import SEED_COST, measure_rollout_cost
from pytest_miles.suite.conftest import require


def test_rollout_cost(engine_factory, miles_settings, miles_record):
    """Only meaningful with real SGLang on a realistic shape: elsewhere it says so and is not
    counted as a measurement (a CPU figure or a 2-layer model's figure would mislead)."""
    require("torch", "torch")
    kind = miles_settings("engine")
    shape = "custom model" if miles_settings("model") else miles_settings("model_shape")
    label = f"cost of determinism: rollout on {kind} ({shape})"
    if not kind.startswith("sglang"):
        miles_record(label, result="not meaningful on CPU (the embedded engine's invariant mode feeds one token "
                     "at a time)", seed_expects=SEED_COST["rollout"])
        raise NotApplicable("cost of determinism: not meaningful on CPU / the embedded engine; run it with "
                            "--miles-engine=sglang --miles-model-shape qwen2.5-0.5b on a GPU")
    if shape in ("tiny", "tiny128"):
        miles_record(label, result=f"not meaningful on the {shape} shape (too small for the kernels that cost)",
                     seed_expects=SEED_COST["rollout"])
        raise NotApplicable(f"cost of determinism: not meaningful on the {shape} shape; use --miles-model-shape "
                            "qwen2.5-0.5b")
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(256)] for _ in range(64)]
    params = SamplingParams(temperature=1.0, max_new_tokens=128)
    # Both alive, so the pairs interleave; whichever is live already (after the negative controls or the
    # batch-invariance tests) is reused and only the other one starts.
    det = engine_factory(kind, deterministic=True, alongside=True)
    non = engine_factory(kind, deterministic=False, alongside=True)
    report = measure_rollout_cost(det, non, prompts, params, pairs=3)
    miles_record(label, **report.figures())


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
