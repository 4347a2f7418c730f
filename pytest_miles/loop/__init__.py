"""The RL loop as a unit test: rollout -> reward -> train -> weight sync -> rollout again, built
from the engines, the trainer session and the checkpoint checks (it launches through them)."""

from __future__ import annotations

from .compare import Divergence, assert_loops_bitwise_equal, first_divergence
from .record import LoopRecord, LoopRun
from .run import LoopConfig, run_loop

__all__ = ["Divergence", "LoopConfig", "LoopRecord", "LoopRun", "assert_loops_bitwise_equal",
           "first_divergence", "run_loop"]
