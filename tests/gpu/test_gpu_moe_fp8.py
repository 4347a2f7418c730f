"""The FP8 block-wise mixture-of-experts cell end to end on a Hopper host, with and without rollout
routing replay: SGLang (deterministic, triton or flashinfer attention; its MoE runner is triton on
Hopper) serves the block-wise FP8 twin of a Qwen3-MoE shape (experts included, router bf16) and
records its experts; megatron-core scores the sampled ids from the bf16 weights, in fp32 (local spec),
bf16 or FP8 block-wise (TransformerEngine spec, TEGroupedMLP), once routing by itself and once replaying
the rollout's experts. The bf16/FP8 trainers skip with the reason where TransformerEngine is missing.

    python3 -m pytest tests/gpu/test_gpu_moe_fp8.py -v -s -rs -p no:cacheprovider -p no:randomly \
        --miles-require-gpu --miles-report out/moe-fp8.json
(after scripts/gpu-host.sh te-install, with /tmp/miles-te/env.sh sourced: scripts/gpu-steps/moe-fp8.steps)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(1200)]

# File order is engine order: the engine factory keeps one live configuration, so the cells that share
# an engine (shape, backend) stand together, the unified FP8 cell first (what a short session must not miss),
# the fp32 cell (the local spec: runs without TransformerEngine) last.
# "fp8_blockwise-sequential": the same cell with a SequentialMLP of TE linears in place of TEGroupedMLP.
CELLS = [
    ("tiny128-moe", "triton", "fp8_blockwise"), ("tiny128-moe", "triton", "fp8_blockwise-sequential"),
    ("tiny128-moe", "triton", "bf16"), ("tiny128-moe", "triton", "fp32"),
    ("qwen3-30b-a3b-2l", "triton", "fp8_blockwise"), ("qwen3-30b-a3b-2l", "triton", "bf16"),
    ("qwen3-30b-a3b-2l", "triton", "fp32"),
    ("tiny128-moe", "flashinfer", "fp8_blockwise"), ("tiny128-moe", "flashinfer", "fp32"),
]


@pytest.fixture(scope="module")
def cells_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("moe-fp8")


def test_fp8_moe_checkpoint_is_what_sglang_loads(cells_dir):
    """The tiny128-moe FP8 twin: every expert FP8 with its 128x128 FP32 scales, routers bf16, and SGLang's
    own Fp8Config parse of its quantization_config (block [128, 128], FP8-serialized)."""
    from pytest_miles.models.quantized_checkpoints import sglang_fp8_config
    from pytest_miles.models.quantized_moe import TINY128_MOE, check_moe_fp8_layout
    from pytest_miles.scenarios.moe_precision import rollout_checkpoint

    _, fp8 = rollout_checkpoint(cells_dir, "tiny128-moe", "fp8_blockwise")
    assert check_moe_fp8_layout(fp8, TINY128_MOE) == []
    qc = sglang_fp8_config(fp8)
    assert qc.weight_block_size == [128, 128] and qc.is_checkpoint_fp8_serialized
    print(f"\nSGLang's Fp8Config: block {qc.weight_block_size}, activation {getattr(qc, 'activation_scheme', '?')}, "
          f"ignored {getattr(qc, 'ignored_layers', '?')}")


@pytest.mark.parametrize(("shape", "backend", "train"), CELLS, ids=["-".join(c) for c in CELLS])
def test_moe_fp8_cell_with_and_without_routing_replay(shape, backend, train, engine_factory, megatron_trainer_factory,
                                                      miles_hardware, miles_record, miles_settings, cells_dir):
    from pytest_miles.errors import CellNotRunnable
    from pytest_miles.scenarios.moe_precision import measure_moe_precision_cell

    train, _, layout = train.partition("-")
    try:
        cell = measure_moe_precision_cell(engine_factory, megatron_trainer_factory, shape=shape,
                                          rollout="fp8_blockwise", train=train, backend=backend, work_dir=cells_dir,
                                          hardware=miles_hardware, record=miles_record,
                                          grouped_experts=layout != "sequential")
    except CellNotRunnable as exc:
        pytest.skip(str(exc))
    print(f"\n{cell.render()}\nfigures {cell.figures()}\nfacts {cell.facts}")
    _keep(cell, miles_settings("report"))
    log = Path(cell.facts["engine_log"]).read_text(errors="replace") if cell.facts["engine_log"] else ""
    assert "Detected fp8 checkpoint" in log, (f"SGLang's log ({cell.facts['engine_log'] or 'none'}) does not say "
                                              "it loaded the FP8 checkpoint (layers/quantization/fp8.py:246)")
    r = cell.replay
    assert r.decisions > 0 and r.without.pairs["train_vs_decode"].tokens > 0, cell.render()
    assert r.differ_replayed == 0, f"the replayed forward did not route as the rollout did:\n{cell.render()}"
    assert all(math.isfinite(x) for x in (*r.gap(False), *r.gap(True))), cell.render()
    if not r.differ_without:  # routing already agreed everywhere: replay must not move a bit
        assert r.bitwise_same == r.without.pairs["train_vs_decode"].tokens, cell.render()


def _keep(cell, report: str | None) -> None:
    """The cell's whole record (per token, both routings) beside --miles-report, for docs/validation."""
    if not report:
        return
    layout = "-sequential" if "TE linears" in cell.experts else ""
    name = f"{cell.shape}-{cell.backend}-{cell.rollout}-x-{cell.train}{layout}"
    path = Path(report).with_suffix(f".moe-fp8-{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cell.to_json(), indent=1))
    print(f"cell record: {path}")
