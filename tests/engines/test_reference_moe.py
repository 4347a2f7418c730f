"""The embedded reference engine on the mixture-of-experts shape (tiny-moe): batch-invariant in
deterministic mode in every mode, twice; the batched engine (determinism off) is caught."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from pytest_miles import SamplingParams, assert_batch_invariant, check_batch_invariance  # noqa: E402
from pytest_miles.engines.reference import ReferenceEngine  # noqa: E402
from pytest_miles.models.shapes import write_shape  # noqa: E402


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return write_shape(tmp_path_factory.mktemp("tiny-moe") / "m", "tiny-moe", dtype="float32")


SMALL = {"params": SamplingParams(max_new_tokens=4, temperature=0.0), "max_batch": 4, "prompt_len": 8}


@pytest.mark.parametrize("mode", ["single", "p_vs_d"])
def test_moe_reference_is_batch_invariant_twice(moe_dir, mode):
    with ReferenceEngine(moe_dir, deterministic=True) as eng:
        first = assert_batch_invariant(eng, mode=mode, trials=3, **SMALL)
        second = assert_batch_invariant(eng, mode=mode, trials=3, **SMALL)
    assert first.passed and second.passed and first.samples >= 3
    assert all(n == 1 for n in first.unique.values()), first.unique


def test_moe_batched_reference_is_caught(moe_dir):
    with ReferenceEngine(moe_dir) as batched:
        report = check_batch_invariance(batched, "single", trials=4, **{**SMALL, "max_batch": 8})
    assert not report.passed, "the batched MoE engine (per-expert GEMMs sized by the batch) must vary"


def test_sglang_routed_experts_are_decoded_into_a_record():
    """SGLang's meta_info.routed_experts: base64 of int32 ids shaped [tokens, layers, top-k]."""
    import base64

    import numpy as np

    from pytest_miles.engines.base import EngineError
    from pytest_miles.engines.routing import decode_routed_experts

    ids = np.array([[[3, 1], [0, 7]], [[2, 5], [6, 4]], [[1, 0], [1, 2]]], dtype=np.int32)  # 3 tokens, 2 layers
    rec = decode_routed_experts(base64.b64encode(ids.tobytes()).decode(), 2, 2, [9, 8])
    assert rec.experts == (((1, 3), (0, 7)), ((2, 5), (4, 6))) and rec.tokens == (9, 8)
    with pytest.raises(EngineError, match="expected at least 4 tokens x 2 layers x top-2"):
        decode_routed_experts(base64.b64encode(ids.tobytes()).decode(), 2, 2, [1, 2, 3, 4])
