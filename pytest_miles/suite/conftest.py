"""Shared pieces of the bundled suite."""

from __future__ import annotations

import importlib.util

import pytest

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
