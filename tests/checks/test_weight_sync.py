"""A weight sync that did something, judged over records (no launch): served == the trainer's live
parameters and changed wherever those changed; a stale sync and a wrong payload named apart."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pytest_miles.checks.weight_sync import assert_sync_took_effect, judge_sync  # noqa: E402


def state(v: float):
    return {"a": torch.full((2, 3), v), "b": torch.full((4,), 1.0)}


def test_sync_took_effect():
    r = assert_sync_took_effect(judge_sync(3, state(0.5), state(0.25), state(0.5), state(0.25)))
    assert r.passed and r.changed == ["a"] and "iteration 3: weight sync took effect: 1 of 2 tensors" in r.render()


def test_stale_sync_named_at_its_iteration():
    """Negative control: the trainer changed `a`, the engine still serves the old `a`."""
    r = judge_sync(2, state(0.5), state(0.25), state(0.5), state(0.5))
    with pytest.raises(
        AssertionError,
        match=r"iteration 2: weight sync did nothing for 1 of the 1 tensors the trainer changed \(first: a\)",
    ):
        assert_sync_took_effect(r)
    assert r.stale == ["a"]


def test_frozen_initial_payload_named():
    """Negative control (verl#7495's failure): every sync pushes the initial model. At iteration 3
    the engine's weights change (from a stale earlier state) but are not the trainer's."""
    r = judge_sync(3, state(0.25), state(0.125), state(0.7), state(0.5))
    assert r.mismatch == ["a"] and not r.stale
    with pytest.raises(AssertionError, match="payload sent is not what the trainer holds"):
        assert_sync_took_effect(r)


def test_bf16_served_compared_in_its_dtype():
    live = {"a": torch.tensor([1.0 + 2**-12, 2.0])}
    served = {"a": live["a"].to(torch.bfloat16).float()}
    r = judge_sync(1, {"a": torch.tensor([0.5, 2.0])}, live, {"a": torch.tensor([0.5, 2.0])}, served, "bfloat16")
    assert r.passed, r.render()
    assert not judge_sync(1, live, live, served, served).changed  # nothing changed: not a pass
    assert not judge_sync(1, live, live, served, served).passed
