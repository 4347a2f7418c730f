"""Doctor: the deterministic environment the plugin applies must pass every check."""

from __future__ import annotations

from pytest_miles import run_doctor

FAIL = "fail"  # a finding's status when a check fails (see `pytest-miles doctor --json`)


def test_applied_environment_passes_doctor(deterministic_env, miles_settings, miles_record):
    findings = run_doctor(attention_backend=miles_settings("attention_backend"), import_torch=True)
    failing = [f for f in findings if f.status == FAIL]
    miles_record("doctor (deterministic environment applied)", kind="setup", ok=sum(f.status == "ok" for f in findings),
                 failing=len(failing))
    if failing:
        raise AssertionError("the deterministic environment still has findings:\n"
                             + "\n".join(f.line() for f in failing))


def test_ambient_environment(miles_settings, miles_record):
    """The shell's own env vars: reported, not failed, since the plugin's workers get the fixed env."""
    findings = run_doctor(attention_backend=miles_settings("attention_backend"), process_checks=False)
    bad = [f.check for f in findings if f.status == FAIL]
    miles_record("doctor (ambient environment, reported only)", kind="setup", failing=", ".join(bad) or "none")
