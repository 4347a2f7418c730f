"""Train-rollout parity end to end on CPU: the reference engine (decode and prefill) vs real
megatron-core on gloo scoring the same ids on the same weights; a token shift planted in what the
trainer is given is an identity error, not drift. One trainer session serves the module."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict

import pytest

from pytest_miles.checks.parity import assert_parity
from pytest_miles.engines.base import SamplingParams
from pytest_miles.engines.reference import ReferenceEngine
from pytest_miles.errors import Unbudgeted
from pytest_miles.models.embedded import TinyConfig, write_hf_checkpoint
from pytest_miles.scenarios.parity import measure_parity

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core not installed"),
              pytest.mark.timeout(300)]
CFG = TinyConfig()
PROMPTS = [[5, 17, 99, 3], [44, 8, 301, 77, 12, 6, 9], [250, 11]]
PARAMS = SamplingParams(temperature=1.0, max_new_tokens=10, sampling_seed=7, ignore_eos=True)
KEY = {"model": "tiny", "rollout": "fp32", "train": "fp32", "backend": "torch-reference", "tp": 1}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("parity") / "hf", CFG, dtype="float32")


@pytest.fixture(scope="module")
def session(rl_loop_factory, weights):
    from pytest_miles.trainers.config import ModelArgs

    trainer = rl_loop_factory.make_trainer(seed=1, model=ModelArgs.qwen2(CFG, rotary_interleaved=True))
    with trainer.session(init_hf=weights, hf_config=asdict(CFG)) as s:
        yield s


def test_reference_engine_vs_megatron_core(session, weights, tmp_path):
    engine = ReferenceEngine(weights, deterministic=True)
    report = measure_parity(engine, session, PROMPTS, params=PARAMS, config=KEY, plot=tmp_path / "parity.png")
    assert not report.identity, report.identity
    assert set(report.pairs) == {"train_vs_decode", "train_vs_prefill", "prefill_vs_decode"}
    f = report.pairs["train_vs_decode"]
    assert f.tokens == 30 and len(f.by_position) == 10 and 0 < f.mean_abs < 1e-4, report.render()
    # the deterministic reference engine's decode is its prefill, bit for bit
    assert report.pairs["prefill_vs_decode"].bitwise_equal == 30
    assert report.render().count("first generated token") == 3
    assert report.plot is None or report.plot.endswith("parity.png")
    assert_parity(report)  # the packaged budget for this configuration, calibrated from 5 runs
    with pytest.raises(AssertionError, match=r"over its budget: 30 of 30 tokens not bitwise equal|over its budget"):
        assert_parity(report, budget="exact")
    report.config["model"] = "not-budgeted"
    with pytest.raises(Unbudgeted, match="unbudgeted: no parity budget for model=not-budgeted"):
        assert_parity(report)


def test_token_shift_is_an_identity_error(session, weights):
    """Negative control: the trainer is handed every sample with its prompt one token shorter, so
    it scores each response token from the wrong position (and one token too many)."""
    engine = ReferenceEngine(weights, deterministic=True)

    def shift(samples):
        return [{**s, "prompt_len": s["prompt_len"] - 1} for s in samples]

    report = measure_parity(engine, session, PROMPTS, params=PARAMS, config=KEY, transform=shift)
    assert any("mask" in e for e in report.identity), report.identity
    assert any("token shift: response token 0 was scored from the logits at position" in e
               for e in report.identity), report.identity
    with pytest.raises(AssertionError, match="identity error, not numerical drift"):
        assert_parity(report, budget=1.0)


def test_selected_token_and_shift_named(session, weights):
    """Negative control: same token count, but the trainer is given different response ids."""
    engine = ReferenceEngine(weights, deterministic=True)

    def swap(samples):
        return [{**s, "tokens": s["tokens"][:-2] + s["tokens"][-1:] + s["tokens"][-2:-1]} for s in samples]

    report = measure_parity(engine, session, PROMPTS, params=PARAMS, config=KEY, transform=swap, prefill=False)
    assert any("selected token at response position 8" in e for e in report.identity), report.identity
