"""The precision matrix on the Hopper host: FP8 block-wise cells with real FP8 GEMMs
(torch._scaled_mm on sm_90), compared with the reference quantizer; Blackwell-only cells skip."""

from __future__ import annotations

import pytest

from pytest_miles.facts.precision import precision_matrix

pytestmark = [pytest.mark.hopper]


@pytest.mark.parametrize("cell", precision_matrix())
def test_cell_on_the_gpu(cell, miles_record):
    if not cell.valid:
        cell.assert_rejected()
        return
    from pytest_miles.checks.drift import measure_logprob_drift

    ref = measure_logprob_drift(cell.rollout, cell.train, device="cuda", gpu="h100")
    print(f"\n{ref.render()}")
    figures = {"reference": f"{ref.train_rollout_logprob_abs_diff:.6g}"}
    if "fp8_blockwise" in cell.formats:
        real = measure_logprob_drift(cell.rollout, cell.train, device="cuda", gemm="scaled_mm")
        print(real.render())
        figures["fp8_gemm"] = f"{real.train_rollout_logprob_abs_diff:.6g}"
        if cell.unified:
            assert real.train_rollout_logprob_abs_diff == 0.0
        else:
            assert real.train_rollout_logprob_abs_diff > 0
    if cell.unified:
        assert ref.train_rollout_logprob_abs_diff == 0.0
    miles_record(f"precision {cell.id} on GPU", **figures)
