"""Train-rollout parity over records (no launch): identity errors apart from drift, the figures
(first token vs rest, confidence buckets, K3-KL, bitwise-equal count, by position), budgets."""

from __future__ import annotations

import math

import pytest

from pytest_miles.capabilities.parity_budgets import Budget
from pytest_miles.checks.parity import ParityRecord, assert_parity, compare_parity
from pytest_miles.errors import InputError, Unbudgeted

KEY = {"model": "m", "rollout": "bf16", "train": "bf16", "backend": "b", "tp": 1}


def rec(decode, train, prompt=(1, 2, 3), **kw):
    sampled = kw.pop("sampled", list(range(10, 10 + len(decode))))
    return ParityRecord(list(prompt), sampled, decode, train, **kw)


def test_figures():
    r = [rec([-0.01, -1.0, -2.0], [-0.01, -1.5, -2.0], prefill=[-0.01, -1.0, -2.0]),
         rec([-0.3, -0.05], [-0.2, -0.05])]
    report = compare_parity(r, KEY)
    f = report.pairs["train_vs_decode"]
    assert (f.tokens, f.bitwise_equal) == (5, 3)
    assert f.mean_abs == pytest.approx(0.6 / 5) and f.max_abs == pytest.approx(0.5)
    assert f.first_token_mean_abs == pytest.approx(0.05) and f.rest_mean_abs == pytest.approx(0.5 / 3)
    assert f.by_position == pytest.approx([0.05, 0.25, 0.0])
    k3 = [math.expm1(d) - d for d in (0.0, -0.5, 0.0, 0.1, 0.0)]
    assert f.k3_kl == pytest.approx(sum(k3) / 5)
    assert f.by_bucket["p>=0.99"]["tokens"] == 1 and f.by_bucket["p<0.5"]["max_abs"] == pytest.approx(0.5)
    assert "train_vs_prefill" not in report.pairs  # one sequence had no prefill: not half a figure
    assert_parity(report, budget=0.2)
    with pytest.raises(AssertionError, match=r"mean_abs 0.12 > 0.1(.|\n)*worst tokens: seq 0 pos 1 -0.5"):
        assert_parity(report, budget=0.1)
    with pytest.raises(AssertionError, match="2 of 5 tokens not bitwise equal"):
        assert_parity(report, budget="exact")
    tight = Budget("m", "bf16", "bf16", "b", 1, "tolerance", mean_abs=1.0, max_abs=0.4, source="t")
    with pytest.raises(AssertionError, match=r"max_abs 0.5 > 0.4"):
        assert_parity(report, budget=tight)


def test_identity_errors_are_not_drift():
    r = [rec([-1.0, -2.0], [-1.0, -2.0], train_targets=[10, 12], train_positions=[2, 3]),
         rec([-1.0, -2.0], [-1.0, -2.0], train_positions=[3, 4]),
         rec([-1.0, -2.0], [-1.0])]
    report = compare_parity(r, KEY)
    text = "\n".join(report.identity)
    assert "sequence 0: selected token at response position 1: the trainer took the logprob of id 12, the engine " \
           "sampled id 11" in text
    assert "sequence 1: token shift: response token 0 was scored from the logits at position 3, expected 2" in text
    assert "sequence 2: mask: the trainer scored 1 response tokens, the engine sampled 2" in text
    with pytest.raises(AssertionError, match="identity error, not numerical drift"):
        assert_parity(report, budget=10.0)  # the numbers agree; the semantics do not


def test_unbudgeted_is_never_passed(tmp_path):
    report = compare_parity([rec([-1.0], [-1.0])], KEY)
    with pytest.raises(Unbudgeted, match=r"unbudgeted: no parity budget for model=m x rollout=bf16"):
        assert_parity(report)
    f = tmp_path / "b.toml"
    f.write_text('[[budget]]\nmodel = "m"\nrollout = "bf16"\ntrain = "bf16"\nbackend = "b"\ntp = 1\nkind = "exact"\n')
    assert assert_parity(report, budgets_file=str(f)) is report
    with pytest.raises(InputError, match="assert_parity.budget='loose'."):
        assert_parity(report, budget="loose")
    with pytest.raises(InputError, match="no records"):
        compare_parity([])
