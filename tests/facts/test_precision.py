"""The precision matrix as data and tests: cells per GPU, rules, quantizers, drift."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pytest_miles import measure_logprob_drift, validate_precision_config  # noqa: E402
from pytest_miles.facts.precision import FORMATS, RULE_EXCLUSIVE, RULE_MXFP8, Cell, cell_status  # noqa: E402
from pytest_miles.models.quantize import (  # noqa: E402
    E2M1_VALUES,
    dequantize,
    fake_quant,
    quantize_fp8_blockwise,
    quantize_mxfp8,
    quantize_nvfp4,
)

SUPPORTED = {("bf16", "bf16"), ("fp8_blockwise", "fp8_blockwise"), ("fp8_blockwise", "bf16"), ("mxfp8", "mxfp8")}
RUNS = {  # seed 004's hardware table
    "h100": {("bf16", "bf16"), ("fp8_blockwise", "fp8_blockwise"), ("fp8_blockwise", "bf16")},
    "b200": SUPPORTED,
    "a100": {("bf16", "bf16")},
    "mi300x": {("bf16", "bf16")},
}


@pytest.mark.parametrize("gpu", list(RUNS))
def test_every_cell_has_the_seed_outcome(gpu):
    for r in FORMATS:
        for t in FORMATS:
            cell = cell_status(r, t)
            assert cell.valid == ((r, t) in SUPPORTED), cell
            if (r, t) in RUNS[gpu]:
                assert validate_precision_config(r, t, gpu).valid
            else:
                with pytest.raises(ValueError) as exc:
                    validate_precision_config(r, t, gpu)
                text = str(exc.value)
                if (r, t) in SUPPORTED:
                    fmt = next(f for f in (r, t) if f != "bf16")
                    assert text.startswith(f"{fmt} needs ") and "1 x " in text, text


MATRIX_TESTS = """
import pytest
from pytest_miles.facts.precision import precision_matrix, validate_precision_config

@pytest.mark.parametrize("cell", precision_matrix())
def test_cell(cell):
    if not cell.valid:
        with pytest.raises(ValueError) as exc:
            validate_precision_config(cell.rollout, cell.train)
        assert str(exc.value) == cell.status
"""


@pytest.mark.parametrize("gpu,passed,skipped", [("h100", 15, 1), ("b200", 16, 0), ("a100", 13, 3),
                                                ("mi300x", 13, 3), ("none", 13, 3)])
def test_precision_matrix_params_skip_by_forced_gpu(pytester, gpu, passed, skipped):
    pytester.makepyfile(MATRIX_TESTS)
    result = pytester.runpytest("-rs", f"--miles-gpu-class={gpu}")
    result.assert_outcomes(passed=passed, skipped=skipped)
    if gpu == "h100":
        result.stdout.fnmatch_lines(["SKIPPED * mxfp8 needs blackwell (B200/B300/GB200/GB300); found 1 x NVIDIA H100*"])
    if gpu == "a100":
        result.stdout.fnmatch_lines(["SKIPPED * fp8_blockwise needs hopper * found 1 x NVIDIA A100 (sm_80)"])
    ids = pytester.runpytest("--collect-only", "-q").stdout.str()
    assert "test_cell[rollout=fp8_blockwise-train=bf16]" in ids


def test_rules_and_bad_names():
    with pytest.raises(ValueError, match=RULE_EXCLUSIVE):
        validate_precision_config(["fp8_blockwise", "mxfp8"], "bf16")
    with pytest.raises(ValueError) as exc:
        validate_precision_config("fp8_blockwise", "mxfp8")
    assert str(exc.value) == RULE_MXFP8
    with pytest.raises(ValueError, match="rollout: unknown precision format 'fp16'; known: bf16, fp8_blockwise"):
        validate_precision_config("fp16", "bf16")
    with pytest.raises(ValueError, match="train: unknown precision format 'int4'"):
        validate_precision_config("bf16", "int4")
    with pytest.raises(ValueError, match="unknown precision format 'fp4'"):
        fake_quant(torch.ones(4), "fp4")
    with pytest.raises(ValueError, match="coming soon"):
        validate_precision_config("nvfp4", "nvfp4")


# ---- quantizers --------------------------------------------------------------------------------


def test_fp8_blockwise_scales_blocks_and_error():
    x = torch.randn(300, 200, generator=torch.Generator().manual_seed(0)) * 5
    q = quantize_fp8_blockwise(x)
    assert q.values.dtype == torch.float8_e4m3fn and q.scales.dtype == torch.float32
    assert q.scales.shape == (3, 2), "one scale per 128x128 block, edge blocks padded"
    d = dequantize(q)
    assert d.shape == x.shape
    for bi in range(3):
        for bj in range(2):
            blk = x[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
            assert q.scales[bi, bj] == blk.abs().max() / 448, "scale = block amax / 448, padding never counts"
    big = x.abs() > x.abs().max() / 64
    assert ((d - x).abs()[big] / x.abs()[big]).max() <= 2**-4 + 1e-6, "e4m3: 3 mantissa bits"


def test_mxfp8_scales_are_powers_of_two():
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(1)) * 100
    q = quantize_mxfp8(x)
    assert q.scales.dtype == torch.uint8 and q.scales.shape == (4, 3)
    exps = q.scales.float() - 127
    assert torch.equal(exps, exps.round())
    amax = x.reshape(4, 3, 32).abs().amax(-1)
    assert torch.equal(exps, torch.floor(torch.log2(amax)) - 8), "OCP MX: floor(log2(amax)) - emax(e4m3)=8"
    assert dequantize(q).shape == x.shape


def test_nvfp4_values_and_two_level_scales():
    x = torch.randn(8, 48, generator=torch.Generator().manual_seed(2))
    q = quantize_nvfp4(x)
    grid = torch.tensor(E2M1_VALUES)
    assert torch.isin(q.values.abs(), grid).all(), "every value is an E2M1 code"
    assert q.scales.dtype == torch.float8_e4m3fn and q.scales.shape == (8, 3)
    assert q.tensor_scale == x.abs().max() / (448 * 6)
    err = (dequantize(q) - x).abs().reshape(8, 3, 16)
    block_amax = x.abs().reshape(8, 3, 16).amax(-1, keepdim=True)
    # E2M1's widest step is 4 -> 6: half of it is 1/6 of the block's range, plus the FP8 scale's rounding
    assert (err <= block_amax * (1 / 6) * 1.07).all()


@pytest.mark.parametrize("quant", [quantize_fp8_blockwise, quantize_mxfp8, quantize_nvfp4])
def test_zero_blocks_nan_and_saturation(quant):
    x = torch.zeros(2, 256)
    x[1, :16] = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")] + [0.5] * 12)
    d = dequantize(quant(x))
    assert torch.equal(d[0], torch.zeros(256)), "a zero block stays zero (no NaN from 0/0)"
    assert torch.isnan(d[1, 1]) and not torch.isnan(d[1, [0, 2, 3, 4]]).any(), "NaN stays local"
    assert torch.isfinite(d[1, 2]) and d[1, 2] > 0 and d[1, 3] < 0, "infinities saturate"


def test_odd_shapes_are_padded_not_rejected():
    for quant in (quantize_fp8_blockwise, quantize_mxfp8, quantize_nvfp4):
        x = torch.randn(3, 45)
        assert dequantize(quant(x)).shape == (3, 45)
        assert dequantize(quant(torch.randn(45))).shape == (45,)


# ---- drift --------------------------------------------------------------------------------------


def test_unified_cells_drift_exactly_zero_and_mixed_cells_drift():
    for cell in [("bf16", "bf16"), ("fp8_blockwise", "fp8_blockwise"), ("mxfp8", "mxfp8")]:
        assert measure_logprob_drift(*cell, seq_len=32).train_rollout_logprob_abs_diff == 0.0
    mixed = measure_logprob_drift("fp8_blockwise", "bf16", seq_len=32)
    assert mixed.train_rollout_logprob_abs_diff > 0 and mixed.max_abs_diff >= mixed.train_rollout_logprob_abs_diff
    assert mixed.kl >= 0


def test_drift_refuses_a_cell_the_gpu_cannot_run():
    with pytest.raises(ValueError, match="mxfp8 needs blackwell .* found 1 x NVIDIA H100"):
        measure_logprob_drift("mxfp8", "mxfp8", gpu="h100")


def test_drift_table_in_terminal_summary(pytester):
    pytester.makepyfile("""
        import pytest
        from pytest_miles.facts.precision import precision_matrix
        from pytest_miles.checks.drift import measure_logprob_drift

        @pytest.mark.parametrize("cell", [c for c in precision_matrix() if c.values[0].valid])
        def test_drift(cell, miles_record):
            r = measure_logprob_drift(cell.rollout, cell.train, seq_len=16)
            miles_record(f"drift {cell.id}", train_rollout_logprob_abs_diff=r.train_rollout_logprob_abs_diff)
    """)
    result = pytester.runpytest("--miles-gpu-class=b200")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*pytest-miles determinism report*",
                                 "PASSED*drift rollout=bf16-train=bf16*train_rollout_logprob_abs_diff=0.0",
                                 "PASSED*drift rollout=fp8_blockwise-train=bf16*train_rollout_logprob_abs_diff=0.*"])


def test_fp8_gemm_path_runs_where_torch_has_scaled_mm():
    try:
        mixed = measure_logprob_drift("fp8_blockwise", "bf16", seq_len=32, gemm="scaled_mm")
    except (RuntimeError, NotImplementedError) as exc:  # no FP8 GEMM on this device
        pytest.skip(f"torch._scaled_mm unavailable here: {exc}")
    assert mixed.train_rollout_logprob_abs_diff > 0
    assert measure_logprob_drift("fp8_blockwise", "fp8_blockwise", seq_len=32,
                                 gemm="scaled_mm").train_rollout_logprob_abs_diff == 0.0
    with pytest.raises(ValueError, match="gemm: 'cutlass' is not one of reference, scaled_mm"):
        measure_logprob_drift("bf16", "bf16", gemm="cutlass")


def test_cell_assert_rejected_is_a_check_that_can_fail():
    invalid = cell_status("bf16", "mxfp8")
    invalid.assert_rejected()
    with pytest.raises(AssertionError, match=r"rollout=bf16-train=bf16: accepted, but the compatibility table says"):
        Cell("bf16", "bf16", False, "made-up rule").assert_rejected()  # NEGATIVE CONTROL: a valid pair marked invalid
    with pytest.raises(AssertionError, match=r"rejected with .*expected 'another rule'"):
        Cell("bf16", "mxfp8", False, "another rule").assert_rejected()


def test_precision_cell_is_named_apart_from_the_capability_cell():
    from pytest_miles import capabilities
    from pytest_miles.facts.precision import PrecisionCell

    assert Cell is PrecisionCell and isinstance(cell_status("bf16", "bf16"), PrecisionCell)
    assert capabilities.Cell is not PrecisionCell and capabilities.Cell.__name__ == "Cell"
