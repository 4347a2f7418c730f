"""Rollout routing replay on CPU: the embedded reference engine samples the tiny-moe shape and
records its routing; real megatron-core MoE on gloo scores the same ids on the same weights with and
without replaying that routing. A planted rollout-side router nudge (the negative control) makes
routing differ: replay brings agreement to 100% and narrows the logprob gap. Without the nudge the
routing already agrees, and replay changes no bit of the trainer's logprobs."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict

import pytest

from pytest_miles import measure_routing_replay
from pytest_miles.engines.base import SamplingParams
from pytest_miles.engines.reference import ReferenceEngine
from pytest_miles.models.moe import MOE_SHAPES, write_moe_checkpoint
from pytest_miles.scenarios.routing_replay import nudge_router

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core not installed"),
              pytest.mark.timeout(300)]
CFG = MOE_SHAPES["tiny-moe"]
PROMPTS = [[5, 17, 99, 3], [44, 8, 301, 77, 12, 6, 9]]
PARAMS = SamplingParams(temperature=1.0, max_new_tokens=8, sampling_seed=7, ignore_eos=True)
KEY = {"model": "tiny-moe", "rollout": "fp32", "train": "fp32", "backend": "torch-reference", "tp": 1}
NUDGE = nudge_router(layer=0, expert=3, amount=1.0)


@pytest.mark.slow
def test_replay_aligns_routing_and_narrows_the_gap_and_changes_nothing_when_routing_agrees(tmp_path):
    from pytest_miles.scenarios.loop.run import host_threads
    from pytest_miles.trainers.megatron import MegatronTrainer, ModelArgs

    hf = write_moe_checkpoint(tmp_path / "hf", CFG, dtype="float32")
    model = ModelArgs.qwen3_moe(CFG, seq_length=32, rotary_interleaved=True)  # the reference engine's RoPE
    with MegatronTrainer(seed=1, model=model, log_dir=tmp_path / "logs").session(
            init_hf=hf, hf_config=asdict(CFG)) as session, host_threads(1):
        engine = ReferenceEngine(hf, deterministic=True)
        planted = measure_routing_replay(engine, session, PROMPTS, params=PARAMS, config=KEY, router_hooks=(NUDGE,))
        clean = measure_routing_replay(engine, session, PROMPTS, params=PARAMS, config=KEY)
    print(planted.render(), clean.render(), sep="\n")
    # the negative control: the nudged rollout routed differently, replay makes the trainer follow it
    assert planted.differ_without > 0 and planted.routing_without[0].first is not None, planted.render()
    assert planted.differ_replayed == 0 and planted.agreement(True) == 1.0, planted.render()
    assert planted.gap(True)[0] < planted.gap(False)[0], planted.render()
    # routing already agrees: replay forces the experts the trainer chose anyway, not one bit moves
    assert clean.decisions == planted.decisions == 2 * (4 + 7 + 2 * 8)
    assert clean.differ_without == clean.differ_replayed == 0, clean.render()
    assert clean.bitwise_same == 2 * 8 and clean.gap(True) == clean.gap(False), clean.render()
