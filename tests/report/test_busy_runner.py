"""A main job that survives a busy runner: a stage that runs past pytest-timeout's limit is reported
as a timeout of that stage (not as a determinism failure), and the suite scales the limit by load."""

from __future__ import annotations

import json
import sys

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
    result.stdout.fnmatch_lines(["*1 determinism checks: 0 passed, 0 failed, 0 not applicable, 1 timeout*"])


def test_suite_timeouts_scale_with_the_load(monkeypatch):
    from pytest_miles.suite import conftest

    monkeypatch.setattr(conftest.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(conftest.os, "cpu_count", lambda: 2)
    assert conftest.machine_factor() == 4.5
    monkeypatch.setattr(conftest.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert conftest.machine_factor() == 1.0


SLOW_ENGINE = """
import sys
from pytest_miles.engines.server import ServerEngine
from pytest_miles.placement.processes import free_port

def test_engine_never_healthy(miles_record, tmp_path):
    # a real process that never answers its health check: the engine start-up stage is the slow one
    eng = ServerEngine([sys.executable, "-c", "import time; time.sleep(120)"], port=free_port(),
                       startup_timeout=60, log_dir=tmp_path)
    with eng:
        pass
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_timeout_names_the_slow_stage(pytester, workers):
    """pytest-timeout fires while an engine starts: the report says that stage, with its limit."""
    pytester.makepyfile(SLOW_ENGINE)
    out = pytester.path / "r.json"
    result = pytester.runpytest_subprocess("-n", workers, "--timeout=3", "--timeout-method=signal",
                                           f"--miles-report={out}")
    result.assert_outcomes(failed=1)
    (check,) = json.loads(out.read_text())["checks"]
    assert check["outcome"] == "timeout"
    assert "while starting server (limit 60 s), " in check["reason"] and " s in" in check["reason"]


def test_engine_start_limits_keep_a_margin_over_every_measured_cold_start():
    from pytest_miles.facts.kernel_caches import COLD_STARTS, MIN_START_LIMIT, start_limit

    for c in COLD_STARTS:
        assert start_limit(c.engine, c.backend) >= 1.2 * c.seconds, c  # never within 20% of a cold start
    assert start_limit("sglang", "flashinfer") == 471.0  # 314 s cold on an H200 beside four servers (238 s JIT)
    assert start_limit("sglang", "fa3") >= 1.2 * max(c.seconds for c in COLD_STARTS)  # unmeasured: the slowest
    assert start_limit("reference-server", "flashinfer") == MIN_START_LIMIT


def test_suite_adds_the_engine_start_limit_to_tests_that_start_engines(pytester):
    """The bundled suite's conftest: a test with engine_factory may pay two cold starts (the load
    factor, if this machine is busy, multiplies both limits alike)."""
    pytester.makeconftest("from pytest_miles.suite.conftest import pytest_collection_modifyitems  # noqa\n")
    pytester.makepyfile("""
        import json, pathlib

        def _limit(request):
            mark = request.node.get_closest_marker("timeout")
            return mark.args[0] if mark else None

        def test_plain(request):
            pathlib.Path("plain.json").write_text(json.dumps(_limit(request)))

        def test_with_engines(request, engine_factory):
            pathlib.Path("engines.json").write_text(json.dumps(_limit(request)))
    """)
    result = pytester.runpytest_subprocess("--timeout=100", "--miles-engine-timeout=30", "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    plain = json.loads((pytester.path / "plain.json").read_text())
    engines = json.loads((pytester.path / "engines.json").read_text())
    if plain is None:  # an idle machine: only the engine test's limit changes
        assert engines == 100 + 2 * 30
    else:  # a busy one: both scaled by the same load factor
        assert abs(engines / plain - 160 / 100) < 0.02, (plain, engines)


STAGED = """
from pytest_miles.recording import stage

def test_staged(miles_record):
    with stage("starting the thing"):
        pass
    with stage("training the thing"):
        pass
    miles_record("a staged check", ok=1)
"""


def test_the_report_has_per_stage_times(pytester):
    pytester.makepyfile(STAGED)
    out = pytester.path / "r.json"
    pytester.runpytest_subprocess(f"--miles-report={out}").assert_outcomes(passed=1)
    (check,) = json.loads(out.read_text())["checks"]
    assert [label for label, _ in check["stages"]] == ["starting the thing", "training the thing"]
    assert all(isinstance(s, float) and s >= 0 for _, s in check["stages"])


def test_the_commit_profile_selects_its_subset(pytester):
    """`pytest-miles suite --miles-suite-profile=commit`: the per-commit subset, the rest deselected."""
    result = pytester.run(sys.executable, "-m", "pytest_miles.cli", "suite", "--miles-suite-profile=commit",
                          "--collect-only", "-q", "-p", "no:randomly")
    lines = [ln.split("::")[-1] for ln in result.stdout.lines if ln.startswith("test_") and "::" in ln]
    from pytest_miles.suite.conftest import COMMIT_PROFILE

    assert sorted(lines) == sorted(COMMIT_PROFILE)
    result.stdout.fnmatch_lines([f"*{len(COMMIT_PROFILE)}/* tests collected (* deselected)*"])


def test_miles_setting_names_a_bad_name(pytester):
    pytester.makeconftest("""
        from pytest_miles import miles_setting

        def pytest_collection_modifyitems(config, items):
            assert miles_setting(config, "trials") == 10
            miles_setting(config, "trails")
    """)
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess()
    result.stdout.fnmatch_lines(["*miles_setting('trails'): not a pytest-miles setting; expected one of*trials*"])
