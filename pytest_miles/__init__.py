"""pytest-miles: determinism of LLM RL stacks (SGLang rollout + Megatron-core training) as tests.

Public helpers are imported on first use, so `import pytest_miles` stays cheap.

PYTEST_DONT_REWRITE: this file holds no assertions; the marker keeps pytest from warning that the
package was imported before it could be rewritten (`pytest-miles suite` imports it first).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "deterministic_env_vars": "environment",
    "DeterministicEnvironment": "environment",
    "run_doctor": "doctor",
    "discover": "hardware",
    "assert_checkpoints_equal": "checks.checkpoints",
    "compare_checkpoints": "checks.checkpoints",
    "assert_batch_invariant": "checks.batch_invariance",
    "assert_runs_bitwise_equal": "checks.runs",
    "assert_resume_equivalent": "checks.runs",
    "assert_served_weights_equal": "checks.served_weights",
    "validate_precision_config": "precision",
    "precision_matrix": "precision",
    "measure_logprob_drift": "checks.drift",
    "assert_logprob_drift": "checks.drift",
    "assert_env_propagated": "cluster.workers",
    "run_on_every_worker": "cluster.workers",
    "assert_same_across_workers": "cluster.workers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'pytest_miles' has no attribute {name!r}")
