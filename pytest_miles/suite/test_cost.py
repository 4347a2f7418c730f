"""The cost of determinism on this stack, measured in the same run as its baseline: rollout
throughput with and without deterministic inference, training step time with and without
deterministic mode, next to the costs the Miles reproducibility guide expects. Each figure carries its spread; one whose
pairs do not show the cost's sign (the rollout's: its spread covers zero; the training's: a sign test) is
reported "inconclusive" (a skip), never a pass."""

from __future__ import annotations

import random
from typing import NoReturn

from pytest_miles import (
    EXPECTED_COST,
    ModelArgs,
    NotApplicable,
    SamplingParams,
    measure_rollout_cost,
    measure_training_cost,
    raise_if_inconclusive,
    sign_verdict,
)
from pytest_miles.suite.conftest import engine_for, require

# The shapes whose training step the figure is taken on: dense and big enough that the step's time is its
# kernels' (Qwen2.5-0.5B's shape, 24 layers), and small enough that twenty fresh models stay cheap.
MEASURED_SHAPES = ("qwen2.5-0.5b",)
TRAINING_SEQ = 256


def _not_taken(miles_record, label: str, figure: str, result: str, message: str) -> NoReturn:
    """Record a figure that is not taken here (`result`, beside what the guide expects of `figure`) and skip
    as not applicable: it is counted as no measurement."""
    miles_record(label, result=result, seed_expects=EXPECTED_COST[figure])
    raise NotApplicable(f"cost of determinism: {message}")


def test_rollout_cost(engine_factory, miles_settings, miles_record):
    """Only meaningful with real SGLang on a realistic shape: elsewhere it says so and is not
    counted as a measurement (a CPU figure or a 2-layer model's figure would mislead)."""
    require("torch", "torch")
    kind = miles_settings("engine")
    shape = "custom model" if miles_settings("model") else miles_settings("model_shape")
    label = f"cost of determinism: rollout on {kind} ({shape})"
    if not kind.startswith("sglang"):
        _not_taken(miles_record, label, "rollout", "not meaningful on CPU (the embedded engine's invariant mode "
                   "feeds one token at a time)", "not meaningful on CPU / the embedded engine; run it with "
                   "--miles-engine=sglang --miles-model-shape qwen2.5-0.5b on a GPU")
    if shape in ("tiny", "tiny128"):
        _not_taken(miles_record, label, "rollout", f"not meaningful on the {shape} shape (too small for the kernels "
                   "that cost)", f"not meaningful on the {shape} shape; use --miles-model-shape qwen2.5-0.5b")
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(256)] for _ in range(64)]
    params = SamplingParams(temperature=1.0, max_new_tokens=128)
    # Both alive, so the pairs interleave; whichever is live already (after the negative controls or the
    # batch-invariance tests) is reused and only the other one starts.
    det = engine_for("deterministic", engine_factory, miles_settings, alongside=True)
    non = engine_for("control", engine_factory, miles_settings, alongside=True)
    report = measure_rollout_cost(det, non, prompts, params, pairs=3)
    raise_if_inconclusive(label, report.figures(), report.costs)
    miles_record(label, **report.figures())


def test_training_cost(megatron_trainer_factory, miles_settings, miles_record):
    """Ten pairs of 8-step runs with deterministic mode on and off, in alternating order (the pool's ranks
    serve both), so that a machine whose load changes over the measurement does not favour one side; the
    sign of the cost is "measured" when a sign test over the pairs says chance would rarely split them so
    (sign_verdict: 9 of 10 on one side), so that one run slowed by a neighbour does not hide it.

    Only meaningful on a GPU with a shape whose step is compute-bound (MEASURED_SHAPES, trained at
    TRAINING_SEQ tokens a sequence): elsewhere it says so and is not counted as a measurement, as the rollout
    figure above. The tiny shapes' GPU step (~20 ms) is launch-bound: on H100 and H200 hosts (2026-12-05) its
    runs' medians spread -32%..+41% between consecutive runs and two runs of one stack measured opposite signs
    (docs/validation/2026-12-05-ninth-round.md)."""
    require("megatron.core", "megatron")
    label = "cost of determinism: megatron training step"
    shape = miles_settings("model_shape")
    device = megatron_trainer_factory(seed=1).device  # a trainer starts no rank until it trains
    if device != "cuda":
        _not_taken(miles_record, label, "training", "not meaningful on CPU (gloo)", "the training step's cost is "
                   f"not meaningful on CPU; run it on a GPU with --miles-model-shape {MEASURED_SHAPES[0]}")
    if shape not in MEASURED_SHAPES:
        why = (f"not meaningful on the {shape} shape, whose training step is launch-bound (its time is noise, "
               "not kernels)" if shape.startswith("tiny") else
               f"not taken on the {shape} shape: it trains twenty fresh models, so it is taken on a dense shape")
        _not_taken(miles_record, label, "training", why, f"{why}; use --miles-model-shape {MEASURED_SHAPES[0]}")
    model = ModelArgs.of_shape(shape, seq_length=TRAINING_SEQ)
    figures, costs = measure_training_cost(lambda **kw: megatron_trainer_factory(model=model, **kw))
    figures["model"] = f"{shape}, {TRAINING_SEQ} tokens a sequence"
    raise_if_inconclusive(label, figures, costs, rule=sign_verdict)
    miles_record(label, **figures)
