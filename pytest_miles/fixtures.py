"""Fixtures of the plugin. Heavy classes are imported inside each fixture, never at import."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # pragma: no cover
    from .environment import DeterministicEnvironment
    from .fingerprint import Fingerprint
    from .hardware import Hardware


def _state(config: pytest.Config):
    from .plugin import state

    return state(config)


@pytest.fixture(scope="session")
def miles_hardware(pytestconfig: pytest.Config) -> Hardware:
    """The GPUs this session may use (after the override and CUDA_VISIBLE_DEVICES)."""
    return _state(pytestconfig).hardware


@pytest.fixture(scope="session")
def miles_fingerprint(pytestconfig: pytest.Config) -> Fingerprint:
    """Everything that decides bitwise results on this machine; `.to_json()`, `.digest`."""
    return _state(pytestconfig).fingerprint


@pytest.fixture(scope="session")
def miles_settings(pytestconfig: pytest.Config):
    """Resolved pytest-miles settings (CLI > env > ini > default) as a callable: settings('trials')."""
    return _state(pytestconfig).setting


@pytest.fixture
def deterministic_env() -> Iterator[DeterministicEnvironment]:
    """The seeds' deterministic environment for one test, restored afterwards."""
    from .environment import DeterministicEnvironment

    with DeterministicEnvironment() as env:
        yield env
