"""The RL loop as a unit test: rollout -> reward -> train -> weight sync -> rollout again, built
from the engines, the trainer session and the checkpoint checks (it launches through them)."""

from __future__ import annotations

from pytest_miles.checks.loop import Divergence, assert_loops_bitwise_equal, first_divergence
from pytest_miles.checks.loop_record import LoopRecord, LoopRun
from pytest_miles.scenarios.loop.run import LoopConfig, run_loop

__all__ = ["Divergence", "LoopConfig", "LoopRecord", "LoopRun", "assert_loops_bitwise_equal",
           "first_divergence", "run_loop"]
