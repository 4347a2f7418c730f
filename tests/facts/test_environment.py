"""The deterministic environment: one source of truth, applied and restored."""

from __future__ import annotations

import os

import pytest

from pytest_miles.facts.environment import DeterministicEnvironment, deterministic_env_vars


def test_env_vars_are_the_seeds():
    assert deterministic_env_vars() == {
        "NCCL_ALGO": "Ring",
        "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0",
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }
    assert deterministic_env_vars({"X": "1"})["X"] == "1"


def test_apply_and_restore(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("NCCL_ALGO", "Tree")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with DeterministicEnvironment(seed=7):
        assert os.environ["NCCL_ALGO"] == "Ring"
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        a = torch.rand(3)
    with DeterministicEnvironment(seed=7):
        b = torch.rand(3)
    assert torch.equal(a, b), "the seed must be applied"
    assert os.environ["NCCL_ALGO"] == "Tree"
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert not torch.are_deterministic_algorithms_enabled()


def test_fixture_applies_for_one_test(pytester, monkeypatch):
    monkeypatch.delenv("NCCL_ALGO", raising=False)
    pytester.makepyfile("""
        import os

        def test_inside(deterministic_env):
            assert os.environ["NCCL_ALGO"] == "Ring"
            assert deterministic_env.env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"

        def test_after():
            assert "NCCL_ALGO" not in os.environ
    """)
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=2)
