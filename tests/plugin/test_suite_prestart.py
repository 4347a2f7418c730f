"""Engines started at session start, as a user and the bundled suite meet them: the suite runs the
tests that need no engine first and prestarts exactly the configurations its selected tests ask
for; a background start that fails is the failure of the test that asks for that engine, with the
server's log, and of no other test."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

NAMES = """
def pytest_collection_finish(session):
    from pytest_miles.suite.conftest import prestart_names, trainer_prestarts

    print("PRESTART=" + ",".join(prestart_names(session.config, session.items)))
    print("TRAINERS=" + ",".join(trainer_prestarts(session.config, session.items)))
"""


def _collect(pytester, *args):
    pytester.makepyfile(prestart_names_plugin=NAMES)
    result = pytester.runpytest_subprocess("--pyargs", "pytest_miles.suite", "--collect-only", "-q",
                                           "-p", "prestart_names_plugin", "-p", "no:randomly", *args)
    names = next(line.split("=", 1)[1] for line in result.outlines if line.startswith("PRESTART="))
    trainers = next(line.split("=", 1)[1] for line in result.outlines if line.startswith("TRAINERS="))
    tests = [line.split("::", 1)[0].rsplit("/", 1)[-1] + "::" + line.split("::", 1)[1]
             for line in result.outlines if ".py::" in line]
    return names, tests, trainers


def test_the_suite_runs_engine_free_tests_first_and_prestarts_what_its_tests_ask_for(pytester):
    names, tests, trainers = _collect(pytester)
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
    # the training runs' pool group, the run-twice check's second group, a spare per RL loop run
    assert trainers == "runs,second-runs,session,session", trainers
    names, _, trainers = _collect(pytester, "-k", "training or doctor")
    assert names == "", "no engine for a selection that needs none"
    assert trainers == "runs,second-runs", trainers
    names, _, trainers = _collect(pytester, "-k", "loop")
    assert trainers == "session,session", trainers
    names, _, trainers = _collect(pytester, "--miles-suite-profile=commit")
    assert names == "control,deterministic" and trainers == "runs,second-runs", (names, trainers)
    names, _, trainers = _collect(pytester, "--miles-engine-prestart=off")
    assert names == "" and trainers == ""
    _, _, trainers = _collect(pytester, "--miles-placement=ray")
    assert trainers == "", "ranks placed as Ray actors: none started here"


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


@pytest.mark.slow
def test_the_suites_training_runs_and_loop_take_the_ranks_started_in_the_background(pytester, tmp_path):
    """End to end on the embedded default, with the Ray checks between the background start and the first
    run (they change the pytest process's environment): every run and loop session of the selection is
    served by a rank group or spare started at session start (a stage of its own in the report), and no
    test starts ranks of its own."""
    pytest.importorskip("megatron.core")
    import json

    report = tmp_path / "report.json"
    result = pytester.runpytest_subprocess("--pyargs", "pytest_miles.suite", "-p", "no:randomly",
                                           "-k", "cluster or run_twice or loop", f"--miles-report={report}")
    result.assert_outcomes(passed=4)
    checks = json.loads(report.read_text())["checks"]
    stages = {c["check"]: [label for label, _ in c.get("stages") or []] for c in checks}
    twice = next(v for k, v in stages.items() if k.startswith("megatron run twice"))
    loop = next(v for k, v in stages.items() if k.startswith("RL loop run twice"))
    background = [x for x in twice + loop if x.startswith("waiting for megatron-core ranks")]
    assert len(background) == 4, stages  # first run, second run, two loop sessions
    assert len({x.split("logs ")[1] for x in background}) == 4, background  # four distinct groups of ranks


def test_a_missing_parent_package_is_not_installed_and_skips_what_needs_it():
    """find_spec("megatron.core") raises where megatron is absent (the wheel without extras): the suite's
    session-start fixture must not turn that into an error of every test."""
    from pytest_miles.errors import Unavailable
    from pytest_miles.suite.conftest import installed, require

    assert installed("json") and not installed("no_such_package_here.core")
    with pytest.raises(Unavailable, match=r"no_such_package_here.core is not installed \(pip install"):
        require("no_such_package_here.core", "megatron")
