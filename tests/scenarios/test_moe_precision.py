"""The MoE precision cell's pure parts on CPU (the cell itself needs SGLang: tests/gpu/test_gpu_moe_fp8.py):
bad names refused before anything is written or started, the GPU's refusal as CellNotRunnable, and the
figures a cell records (gaps and routing agreement, without and with replay)."""

from __future__ import annotations

import pytest

from pytest_miles.checks.parity import ParityRecord, compare_parity
from pytest_miles.checks.routing import RoutingDifference, RoutingReport
from pytest_miles.errors import CellNotRunnable, InputError
from pytest_miles.facts.hardware import parse_override
from pytest_miles.scenarios.moe_precision import MoeCellReport, measure_moe_precision_cell
from pytest_miles.scenarios.routing_replay import RoutingReplayReport


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rollout": "mxfp8"}, r"rollout=\): 'mxfp8' is not accepted; expected one of bf16, fp8_blockwise"),
    ({"train": "nvfp4"}, r"train=\): 'nvfp4' is not accepted; expected one of fp32, bf16, fp8_blockwise"),
    ({"backend": "fa3"}, r"backend=\): 'fa3' is not accepted; expected one of triton, flashinfer"),
    ({"shape": "tiny-moe"}, r"shape=\): shape 'tiny-moe': expected a MoeConfig or one of tiny128-moe"),
])
def test_bad_inputs_are_refused_before_anything_starts(kwargs, message, tmp_path):
    def nothing(*a, **k):
        raise AssertionError("nothing may start for a bad input")

    with pytest.raises(InputError, match=message):
        measure_moe_precision_cell(nothing, nothing, work_dir=tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_a_gpu_that_cannot_run_fp8_is_named(tmp_path):
    ampere = parse_override("a100")
    with pytest.raises(CellNotRunnable, match="fp8_blockwise.*A100"):
        measure_moe_precision_cell(None, None, work_dir=tmp_path, train="fp32", hardware=ampere)
    with pytest.raises(CellNotRunnable, match="fp8_blockwise.*A100"):
        measure_moe_precision_cell(None, None, work_dir=tmp_path, train="fp8_blockwise", hardware=ampere)


def _parity(train):
    return compare_parity([ParityRecord([5, 6], [7, 8, 9], [-1.0, -2.0, -3.0], train)], {"model": "x"})


def test_the_figures_a_cell_records():
    differ = [RoutingDifference(token=2, layer=1, experts_a=(0, 3), experts_b=(0, 4))]
    replay = RoutingReplayReport(
        without=_parity([-1.0, -2.5, -3.0]), replayed=_parity([-1.0, -2.0, -3.125]),
        routing_without=[RoutingReport("sglang", "megatron-core", 5, 2, differ)],
        routing_replayed=[RoutingReport("sglang", "megatron-core", 5, 2, [])],
        train={"without": [[-1.0, -2.5, -3.0]], "replayed": [[-1.0, -2.0, -3.125]]})
    cell = MoeCellReport("tiny128-moe", "fp8_blockwise", "fp8_blockwise", "triton", replay, experts="TEGroupedMLP")
    f = cell.figures()
    assert (f["tokens"], f["routing_decisions"], f["differ_without_replay"], f["differ_with_replay"]) == (3, 10, 1, 0)
    assert (f["agreement_without_replay"], f["agreement_with_replay"]) == ("90.0000%", "100.0000%")
    assert (f["gap_mean_without_replay"], f["gap_max_without_replay"]) == ("0.166667", "0.5")
    assert (f["gap_mean_with_replay"], f["gap_max_with_replay"]) == ("0.0416667", "0.125")
    assert cell.render().startswith("tiny128-moe rollout=fp8_blockwise x train=fp8_blockwise (triton, TEGroupedMLP)")
    assert cell.to_json()["figures"] == f and replay.bitwise_same == 1
