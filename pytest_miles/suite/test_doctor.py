"""Doctor: the deterministic environment the plugin applies must pass every check."""

from __future__ import annotations

import warnings

from pytest_miles.doctor import FAIL, run_doctor


def test_applied_environment_passes_doctor(deterministic_env, miles_settings):
    findings = run_doctor(attention_backend=miles_settings("attention_backend"), import_torch=True)
    failing = [f for f in findings if f.status == FAIL]
    if failing:
        raise AssertionError("the deterministic environment still has findings:\n"
                             + "\n".join(f.line() for f in failing))


def test_ambient_environment(miles_settings):
    """The shell's own env vars: reported, not failed, since the plugin's workers get the fixed env."""
    findings = run_doctor(attention_backend=miles_settings("attention_backend"), process_checks=False)
    for f in findings:
        if f.status == FAIL:
            warnings.warn(f"ambient environment: {f.line()}", stacklevel=1)
