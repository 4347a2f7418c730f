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
    "deterministic_env_vars": "facts.environment",
    "DeterministicEnvironment": "facts.environment",
    "run_doctor": "facts.doctor",
    "engine_start_limit": "plugin.state",
    "miles_setting": "plugin.state",
    "discover": "facts.hardware",
    "assert_checkpoints_equal": "checks.checkpoints",
    "compare_checkpoints": "checks.checkpoints",
    "assert_batch_invariant": "checks.batch_invariance",
    "assert_routing_equal": "checks.routing",
    "compare_routing": "checks.routing",
    "first_routing_difference": "checks.routing",
    "RoutingRecord": "models.routing",
    "assert_deterministic_under_load": "scenarios.traffic",
    "traffic_negative_control": "scenarios.traffic",
    "assert_min_p_served": "scenarios.traffic",
    "assert_sampling_batch_invariant": "scenarios.traffic",
    "cross_check_sglang_tool": "scenarios.sglang_tool",
    "aligned_env": "engines.sglang_chunking",
    "assert_cache_paths_deterministic": "scenarios.cache_api",
    "assert_api_surfaces_agree": "scenarios.cache_api",
    "run_cache_paths": "scenarios.cache_api",
    "run_api_surfaces": "scenarios.cache_api",
    "with_tokenizer": "models.tokenizer_vocab",
    "assert_composition_invariant": "checks.compositions",
    "coverage_cases": "checks.compositions",
    "boundary_lengths": "checks.compositions",
    "assert_runs_bitwise_equal": "scenarios.runs",
    "assert_resume_equivalent": "scenarios.runs",
    "assert_served_weights_equal": "checks.served_weights",
    "validate_precision_config": "facts.precision",
    "precision_matrix": "facts.precision",
    "measure_logprob_drift": "checks.drift",
    "assert_logprob_drift": "checks.drift",
    "measure_precision_cell": "scenarios.precision_cells",
    "measure_parity": "scenarios.parity",
    "measure_routing_replay": "scenarios.routing_replay",
    "assert_parity": "checks.parity",
    "compare_parity": "checks.parity",
    "ParityRecord": "checks.parity",
    "Unbudgeted": "errors",
    "plot_precision_matrix": "scenarios.precision_cells",
    "assert_loops_bitwise_equal": "checks.loop",
    "first_divergence": "checks.loop",
    "assert_env_propagated": "scenarios.workers",
    "run_on_every_worker": "scenarios.workers",
    "assert_same_across_workers": "scenarios.workers",
    "write_hf_checkpoint": "models.embedded",
    "SamplingParams": "engines.base",
    "Output": "engines.base",
    "MODES": "capabilities",
    "check_batch_invariance": "checks.batch_invariance",
    "judge_report": "checks.batch_invariance",
    "negative_control": "checks.batch_invariance",
    "build_manifest": "checks.checkpoints",
    "runs_difference": "scenarios.runs",
    "disagreement_report": "scenarios.workers",
    "tiny_forward_logprobs": "placement.probes",
    "plot_deviation": "report.plot",
    "record": "recording",
    "progress_callback": "recording",
    "config_from_dir": "models.embedded",
    "ModelArgs": "trainers.config",
    "TrainerConfig": "trainers.config",
    "EXPECTED_COST": "scenarios.cost",
    "measure_rollout_cost": "scenarios.cost",
    "measure_training_cost": "scenarios.cost",
    "spread_verdict": "scenarios.cost",
    "sign_verdict": "scenarios.cost",
    "raise_if_inconclusive": "scenarios.cost",
    "Inconclusive": "errors",
    "MilesError": "errors",
    "NotApplicable": "errors",
    "Unavailable": "errors",
    "KnownLimitation": "errors",
    "CellNotRunnable": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'pytest_miles' has no attribute {name!r}")
