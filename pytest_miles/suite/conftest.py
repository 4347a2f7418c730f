"""Shared pieces of the bundled suite."""

from __future__ import annotations

import importlib.util

import pytest


def require(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install 'pytest-miles[{extra}]')")


@pytest.fixture(autouse=True)
def _announce(request, capsys):
    """The suite says where it is, even without -v, while engines and trainers start."""
    with capsys.disabled():
        tr = request.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None and request.config.get_verbosity() > 0:
            tr.write(f"\n[miles] {request.node.nodeid} ... ")
    yield
