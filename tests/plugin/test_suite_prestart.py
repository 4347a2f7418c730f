"""Engines started at session start, as a user and the bundled suite meet them: the suite runs the
tests that need no engine first and prestarts exactly the configurations its selected tests ask
for; a background start that fails is the failure of the test that asks for that engine, with the
server's log, and of no other test."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

NAMES = """
def pytest_collection_finish(session):
    from pytest_miles.suite.conftest import prestart_names

    print("PRESTART=" + ",".join(prestart_names(session.config, session.items)))
"""


def _collect(pytester, *args):
    pytester.makepyfile(prestart_names_plugin=NAMES)
    result = pytester.runpytest_subprocess("--pyargs", "pytest_miles.suite", "--collect-only", "-q",
                                           "-p", "prestart_names_plugin", "-p", "no:randomly", *args)
    names = next(line.split("=", 1)[1] for line in result.outlines if line.startswith("PRESTART="))
    tests = [line.split("::", 1)[0].rsplit("/", 1)[-1] + "::" + line.split("::", 1)[1]
             for line in result.outlines if ".py::" in line]
    return names, tests


def test_the_suite_runs_engine_free_tests_first_and_prestarts_what_its_tests_ask_for(pytester):
    names, tests = _collect(pytester)
    engine_tests = ("test_rollout.py", "test_loop.py", "test_snapshots.py::test_rollout",
                    "test_cost.py::test_rollout")
    first_engine = next(i for i, t in enumerate(tests) if t.startswith(engine_tests))
    assert tests[0].startswith("test_doctor.py"), tests
    # none without engines after them, but the timing measurement: it runs when no engine is starting
    assert tests[-1] == "test_cost.py::test_training_cost", tests
    assert all(t.startswith(engine_tests) for t in tests[first_engine:-1]), tests
    assert any(t.startswith("test_training.py") for t in tests[:first_engine]), tests
    assert tests[first_engine].startswith("test_rollout.py::test_negative_control"), tests
    # in the order the tests will ask for them (the embedded default: the two traffic servers and the
    # cache/API server, on the model folder with a tokenizer, are started in the background, the
    # in-process engines when asked)
    assert names == "control,deterministic,traffic,traffic-control,cache-api", names
    names, _ = _collect(pytester, "-k", "training or doctor")
    assert names == "", "no engine for a selection that needs none"
    names, _ = _collect(pytester, "--miles-engine-prestart=off")
    assert names == ""


def test_a_failed_background_start_fails_the_test_that_asks_for_it_with_the_server_log(pytester):
    pytester.makeconftest("""
        import pytest

        @pytest.fixture(scope="session", autouse=True)
        def prestart(engine_factory):
            assert len(engine_factory.prestart([{"kind": "reference-server", "deterministic": True}])) == 1
    """)
    pytester.makepyfile("""
        def test_runs_meanwhile():
            pass

        def test_asks_for_it(engine_factory):
            engine_factory("reference-server", deterministic=True)
    """)
    # a real start that fails: the embedded server asked to load its model on a GPU this machine lacks
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--miles-device=cuda")
    result.assert_outcomes(passed=1, failed=1)
    text = result.stdout.str()
    assert "the reference-server engine (determinism on), started in the background at session start, failed" in text
    assert "exited with code" in text and "CUDA" in text, text  # the server's own log tail
