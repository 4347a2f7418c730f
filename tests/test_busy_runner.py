"""A main job that survives a busy runner: a stage that runs past pytest-timeout's limit is reported
as a timeout of that stage (not as a determinism failure), and the suite scales the limit by load."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pytest_timeout")

TESTS = """
import time

def test_slow_stage(miles_record):
    miles_record("a check that is slow here", started=1)
    time.sleep(5)
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_timeout_is_a_timeout_of_its_stage(pytester, workers):
    pytester.makepyfile(TESTS)
    out = pytester.path / "r.json"
    result = pytester.runpytest_subprocess("-n", workers, "--timeout=1", "--timeout-method=signal",
                                           f"--miles-report={out}")
    result.assert_outcomes(failed=1)
    data = json.loads(out.read_text())
    (check,) = data["checks"]
    assert check["outcome"] == "timeout" and check["reason"].startswith("timeout of the call stage after ")
    assert "not a determinism verdict" in check["reason"]
    assert data["totals"]["timeout"] == 1 and data["totals"]["failed"] == 0
    assert data["tests"]["failed"] == 1  # pytest's count, stated beside it
    result.stdout.fnmatch_lines(["*1 determinism checks: 0 passed, 0 failed, 0 skipped, 1 timeout*"])


def test_suite_timeouts_scale_with_the_load(monkeypatch):
    from pytest_miles.suite import conftest

    monkeypatch.setattr(conftest.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(conftest.os, "cpu_count", lambda: 2)
    assert conftest.machine_factor() == 4.5
    monkeypatch.setattr(conftest.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert conftest.machine_factor() == 1.0
