"""The RL loop end to end on whatever stack this machine has (reference engine + megatron-core
on gloo on CPU; SGLang + megatron-core on one GPU): two runs bitwise equal at every iteration."""

from __future__ import annotations

from pytest_miles import assert_loops_bitwise_equal
from pytest_miles.suite.conftest import require

ITERATIONS = 3


def test_loop_twice_bitwise_equal(rl_loop_factory, miles_settings, miles_record):
    require("megatron.core", "megatron")
    engine = miles_settings("engine")
    a = rl_loop_factory(engine, iterations=ITERATIONS, seed=1234, name="run1")
    # same engine, initial weights pushed back
    b = rl_loop_factory(engine, iterations=ITERATIONS, seed=1234, name="run2")
    miles_record(f"RL loop run twice ({engine} + megatron-core)", iterations=ITERATIONS,
                 train_rollout_logprob_abs_diff=a.records[-1].train_rollout_logprob_abs_diff,
                 **{f"{k}_s": round(v, 2) for k, v in a.stage_seconds().items()})
    assert_loops_bitwise_equal(a, b)
