"""Shared pieces of the bundled suite."""

from __future__ import annotations

import importlib.util
import os

import pytest

from pytest_miles import engine_start_limit, miles_setting
from pytest_miles.errors import Unavailable


def require(module: str, extra: str) -> None:
    """A part of the suite needs `module`: Unavailable (skip; fail under --miles-require-gpu) without it."""
    if importlib.util.find_spec(module) is None:
        raise Unavailable(f"{module} is not installed (pip install 'pytest-miles[{extra}]')")


@pytest.fixture(autouse=True)
def _announce(request, capsys):
    """The suite says where it is, even without -v, while engines and trainers start."""
    with capsys.disabled():
        tr = request.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None and request.config.get_verbosity() > 0:
            tr.write(f"\n[miles] {request.node.nodeid} ... ")
    yield


# Engine configurations, in the order the suite uses them: a real SGLang engine takes a minute or
# more to start, and the engine factory keeps one live configuration, so grouping the tests that
# share one makes a suite run start two engines (not deterministic, then deterministic) instead of
# one per switch. The negative controls come first: their verdict decides whether a pass of the
# positive check counts (a control that cannot fail makes the positive vacuous).
ORDER = ("test_doctor.py", "test_cluster.py", "test_rollout.py::test_negative_control",
         "test_rollout.py::test_batch_invariance", "test_snapshots.py::test_rollout", "test_cost.py::test_rollout_cost")


@pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle, which would interleave configurations
def pytest_collection_modifyitems(config, items):
    def rank(item):
        module = getattr(getattr(item, "module", None), "__name__", "")
        if not module.startswith("pytest_miles.suite."):
            return len(ORDER) + 1
        name = f"{item.path.name}::{item.name}"
        return next((i for i, p in enumerate(ORDER) if name.startswith(p)), len(ORDER))

    items.sort(key=rank)
    if miles_setting(config, "suite_profile") == "commit":
        keep = [i for i in items if not _is_suite(i) or i.name in COMMIT_PROFILE]
        dropped = [i for i in items if i not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep
    scale_timeouts(config, items)


# The per-commit profile (--miles-suite-profile=commit): a negative control and its positive check on
# one engine pair, training twice and the check that can fail, the doctor. The rest runs nightly.
COMMIT_PROFILE = frozenset({
    "test_applied_environment_passes_doctor", "test_ambient_environment", "test_negative_control[single]",
    "test_batch_invariance[single]", "test_run_twice_bitwise_equal", "test_checkpoint_check_can_fail"})


def _is_suite(item) -> bool:
    return getattr(getattr(item, "module", None), "__name__", "").startswith("pytest_miles.suite.")





TIMEOUT_NOTE = pytest.StashKey[str]()


def pytest_terminal_summary(terminalreporter, config) -> None:
    note = config.stash.get(TIMEOUT_NOTE, None)
    if note:
        terminalreporter.write_line(note)


def machine_factor() -> float:
    """How much slower than an idle machine this one runs now: the 1-minute load average per core,
    at least 1 (a busy 2-core runner at load 9 gets 4.5 x the time)."""
    try:
        return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    except OSError:
        return 1.0


ENGINE_FIXTURES = {"engine_factory": 2, "engine": 1, "sglang_engine": 1, "reference_engine": 1}  # starts a test may pay


def scale_timeouts(config, items) -> None:
    """pytest-timeout's limit (the project's `timeout` ini or --timeout), plus the engine start-up
    limit of this configuration for each engine a test may start (derived from the measured cold
    start with a margin, facts/kernel_caches.py), all scaled for this machine's load when the suite
    starts, so neither a cold kernel cache nor a busy runner turns a slow check into a failure. A
    test with its own timeout marker keeps it."""
    if not config.pluginmanager.has_plugin("timeout"):
        return
    # pytest-timeout's own order: --timeout, then PYTEST_TIMEOUT, then the ini value
    raw = getattr(config.option, "timeout", None) or os.environ.get("PYTEST_TIMEOUT") \
        or config.getini("timeout")
    try:
        limit = float(raw or 0)
    except ValueError:
        return  # pytest-timeout reports its own bad value
    if limit <= 0:
        return
    start = engine_start_limit(config)
    factor = machine_factor()
    changed = False
    for item in items:
        starts = max((n for name, n in ENGINE_FIXTURES.items() if name in getattr(item, "fixturenames", ())),
                     default=0)
        if item.get_closest_marker("timeout") is None and (starts or factor > 1.0):
            item.add_marker(pytest.mark.timeout(round((limit + starts * start) * factor)))
            changed = True
    if changed:
        config.stash[TIMEOUT_NOTE] = (f"suite timeouts: ({limit:.0f} s + {start:.0f} s per engine start-up a test "
                                      f"may pay) x {factor:.1f} (load per core at start)")
