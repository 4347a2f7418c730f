"""Rollout batch invariance in every mode, with its negative control.

The engine is the one --miles-engine chooses (default: the embedded reference engine in
batch-invariant mode; `sglang` for a real SGLang server with --enable-deterministic-inference).
"""

from __future__ import annotations

import pytest

from pytest_miles.checks.batch_invariance import MODES, check_batch_invariance, negative_control

from .conftest import require


@pytest.fixture
def suite_engine(engine_factory, miles_settings):
    require("torch", "torch")
    return engine_factory(miles_settings("engine"))


@pytest.mark.parametrize("mode", MODES)
def test_batch_invariance(suite_engine, miles_settings, miles_record, mode, request):
    from pytest_miles.recording import progress_callback

    progress = progress_callback(f"rollout batch invariance [{mode}]")  # a terminal line; quiet in CI logs and -q
    report = check_batch_invariance(suite_engine, mode, miles_settings("trials"), max_batch=8, prompt_len=24,
                                    progress=progress)
    miles_record(f"rollout batch invariance [{mode}] on {report.engine}", samples=report.samples,
                 unique=max(report.unique.values(), default=0), seconds=round(report.seconds, 2),
                 mismatches=len(report.mismatches))
    if not report.passed:
        raise AssertionError(report.render())


@pytest.mark.parametrize("mode", ["single", "needle"])
def test_negative_control(engine_factory, miles_settings, miles_record, mode, miles_artefact_dir):
    """The same check with determinism off must fail here, or a pass above means nothing."""
    require("torch", "torch")
    eng = engine_factory(miles_settings("engine"), deterministic=False)
    report = negative_control(eng, mode, miles_settings("trials"), max_batch=8, prompt_len=24)
    worst = max(report.max_logprob_deviation.values(), default=0.0)
    from pytest_miles.plot import plot_deviation

    png = plot_deviation(report.max_logprob_deviation, miles_artefact_dir / f"negative-control-{mode}.png",
                         f"negative control [{mode}] on {report.engine}: determinism off")
    miles_record(f"negative control [{mode}] on {report.engine} (determinism off)", caught=len(report.mismatches),
                 max_logprob_deviation=f"{worst:.3g}", plot=str(png) if png else "matplotlib not installed")
