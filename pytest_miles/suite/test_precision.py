"""The rollout x training precision matrix: every cell either rejected with its rule, skipped
where this GPU cannot run it, or measured (train_rollout_logprob_abs_diff)."""

from __future__ import annotations

import pytest

from pytest_miles import precision_matrix
from pytest_miles.suite.conftest import require


@pytest.mark.parametrize("cell", precision_matrix())
def test_precision_cell(cell, miles_record):
    if not cell.valid:
        cell.assert_rejected()
        miles_record(f"precision {cell.id}", kind="refusal", rule=cell.status)
        return
    require("torch", "torch")
    from pytest_miles import assert_logprob_drift

    report = assert_logprob_drift(cell.rollout, cell.train)
    miles_record(f"precision {cell.id}", train_rollout_logprob_abs_diff=f"{report.train_rollout_logprob_abs_diff:.6g}",
                 max=f"{report.max_abs_diff:.4g}", kl=f"{report.kl:.4g}",
                 path=f"reference quantizers in torch ({report.gemm} GEMMs), "
                 "not SGLang FP8 serving or TransformerEngine")
    if not cell.unified:
        assert report.train_rollout_logprob_abs_diff > 0, "a mixed cell must show the drift Miles measures"
