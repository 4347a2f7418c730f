"""Engine fixtures as users meet them: reuse per configuration, teardown with no orphans."""

from __future__ import annotations

import json

import psutil
import pytest

pytest.importorskip("torch")

CONFTEST = """
import json, os, pytest

@pytest.fixture(scope="session", autouse=True)
def record(engine_factory, tmp_path_factory):
    yield
    with open(os.environ["MILES_TEST_RECORD"], "w") as f:
        json.dump({"launches": engine_factory.launches}, f)
"""


def _pids_file(pytester):
    return pytester.path / "pids.txt"


@pytest.mark.slow
def test_engines_are_reused_and_torn_down(pytester, monkeypatch):
    record = pytester.path / "record.json"
    monkeypatch.setenv("MILES_TEST_RECORD", str(record))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(f"""
        def _note(engine):
            with open({str(_pids_file(pytester))!r}, "a") as f:
                f.write(f"{{engine.proc.pid}}\\n")

        def test_one(engine):
            _note(engine)
            assert engine.generate([[5, 6, 7]])[0].output_ids

        def test_two(engine):
            _note(engine)
            assert engine.generate([[5, 6, 7]])[0].output_ids

        def test_fails(engine):
            _note(engine)
            assert False, "a failing test must not leak the engine"

        def test_other_configuration(engine_factory):
            e = engine_factory("reference-server", deterministic=False)
            _note(e)
            assert e.generate([[5, 6]])[0].output_ids
    """)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--miles-engine=reference-server")
    result.assert_outcomes(passed=3, failed=1)
    assert json.loads(record.read_text())["launches"] == 2, "one launch per configuration"
    pids = {int(p) for p in _pids_file(pytester).read_text().split()}
    assert len(pids) == 2
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"engine processes left behind: {alive}"


def test_keyboard_interrupt_still_kills_the_engine(pytester):
    pytester.makepyfile(f"""
        def test_interrupted(engine_factory):
            e = engine_factory("reference-server")
            with open({str(_pids_file(pytester))!r}, "w") as f:
                f.write(str(e.proc.pid))
            raise KeyboardInterrupt
    """)
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    pid = int(_pids_file(pytester).read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_sglang_fixture_skips_with_reason_on_cpu(pytester):
    pytester.makepyfile("""
        def test_needs_sglang(sglang_engine):
            pass
    """)
    result = pytester.runpytest_subprocess("-rs", "--miles-gpu-class=none")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*engine 'sglang' requires*"])
    result = pytester.runpytest_subprocess("-rs", "--miles-gpu-class=none", "--miles-require-gpu")
    result.assert_outcomes(errors=1)
