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


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process engine of a tiny model: one torch thread is far faster on a shared CPU."""
    from pytest_miles.scenarios.loop.run import host_threads

    with host_threads(1):
        yield


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
    report = measure_parity(engine, session, PROMPTS, params=PARAMS, config=KEY, plot=tmp_path / "parity.png",
                            locate=1e-4)
    assert not report.identity, report.identity
    assert "reference and trainer agree within 0.0001 at every one of 13 points" in report.locator, report.locator
    assert set(report.pairs) == {"train_vs_decode", "train_vs_prefill", "prefill_vs_decode"}
    f = report.pairs["train_vs_decode"]
    assert f.tokens == 30 and len(f.by_position) == 10 and 0 < f.mean_abs < 1e-4, report.render()
    # the deterministic reference engine's decode is its prefill, bit for bit
    assert report.pairs["prefill_vs_decode"].bitwise_equal == 30
    assert report.render().count("first generated token") == 3
    assert report.plot is None or report.plot.endswith("parity.png")
    assert_parity(report)  # the packaged budget for this configuration, calibrated from 5 runs
    with pytest.raises(AssertionError, match=r"over its budget: \d+ of 30 tokens not bitwise equal(.|\n)*divergence "
                                             r"locator: sequence \d: reference and trainer agree"):
        assert_parity(report, budget="exact")
    report.config["model"] = "not-budgeted"
    with pytest.raises(Unbudgeted, match="unbudgeted: no parity budget for model=not-budgeted"):
        assert_parity(report)


def test_padded_for_fp8_scores_the_same_tokens(session, weights):
    """measure_parity(pad_multiple=16), as FP8 training needs: the trainer sees every sample padded
    to 16 ids, the report keeps only the real tokens: no identity error, the same figures."""
    engine = ReferenceEngine(weights, deterministic=True)
    plain = measure_parity(engine, session, PROMPTS, params=PARAMS, config=KEY, prefill=False)
    padded = measure_parity(engine, session, PROMPTS, params=PARAMS, config=KEY, prefill=False, pad_multiple=16)
    assert not padded.identity, padded.identity
    a, b = plain.pairs["train_vs_decode"], padded.pairs["train_vs_decode"]
    assert b.tokens == a.tokens == 30
    assert max(abs(x - y) for ra, rb in zip(a.deltas, b.deltas) for x, y in zip(ra, rb)) < 1e-5


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


# ---- the divergence locator on the same session ---------------------------------------------

TOKENS = [5, 17, 99, 3, 44, 8, 301, 77, 12]


def test_locator_engine_vs_trainer_agree_and_planted_fault_found(session, weights, tmp_path):
    """The same weights agree within fp32 noise at every point; a 1% scale planted in layer 1's MLP
    down projection on the engine's side (negative control) is named at layer 1 mlp, not before."""
    import shutil

    from safetensors.torch import load_file, save_file

    from pytest_miles.scenarios.locate import locate_engine_vs_trainer

    clean = locate_engine_vs_trainer(ReferenceEngine(weights, deterministic=True), session, TOKENS, tmp_path / "clean",
                                     tolerance=1e-4)
    assert clean.first is None and len(clean.rows) == 13, clean.render()
    assert clean.rows[0]["name"] == "embedding" and clean.rows[0]["equal"]
    planted = tmp_path / "planted"
    shutil.copytree(weights, planted)
    f = next(planted.glob("*.safetensors"))
    state = load_file(f)
    state["model.layers.1.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"] * 1.01
    save_file(state, str(f))
    prof = locate_engine_vs_trainer(ReferenceEngine(planted, deterministic=True), session, TOKENS, tmp_path / "p",
                                    tolerance=1e-4)
    assert prof.first["name"] == "layers.1.mlp", prof.render()
    assert "first differs at layer 1 mlp" in prof.answer() and "layer 1 post attention norm before it agrees" in \
        prof.answer()
    assert (tmp_path / "p" / "layers.png").exists() or importlib.util.find_spec("matplotlib") is None


def test_locator_two_trainer_runs_step_and_phase(session, weights, tmp_path):
    """Two runs fed the same step 1 and a step 2 whose advantages differ in run b (negative
    control): step 1 agrees forward and backward, step 2's forward agrees (same weights), its
    backward differs first where the loss gradient enters, the logits. The two runs are the module's
    session reset to the initial weights and a fresh optimizer before each (and after)."""
    from pytest_miles.scenarios.locate import locate_trainer_runs

    samples = [{"tokens": TOKENS, "prompt_len": 4, "advantage": 1.0, "old_logprobs": [-1.0] * 5},
               {"tokens": TOKENS[::-1], "prompt_len": 3, "advantage": -1.0, "old_logprobs": [-1.2] * 6}]
    changed = [dict(s, advantage=s["advantage"] * 0.5) for s in samples]
    try:
        same = locate_trainer_runs(session, session, [samples, samples], tmp_path / "same", reset=weights)
        found = locate_trainer_runs(session, session, ([samples, samples], [samples, changed]), tmp_path / "planted",
                                    reset=weights)
    finally:
        session.reset(weights)
    assert same.step is None and "agree at every point of 2 steps" in same.answer()
    assert (found.step, found.phase, found.profile.first["name"]) == (2, "backward", "logits"), found.answer()
    assert found.answer().startswith("step 2, backward, logits first differs")


class _ReferenceInSGLangDumpLayout:
    """The reference engine's prefill written in the layout SGLang's tensor dump writes (hidden and
    residual apart, one torch.save file per pass) and read back by SGLang's dump reader: the SGLang
    side of the locator (names, the fused residual, the pass picked by its ids) on CPU. Not SGLang."""

    name = "reference in SGLang's dump layout"

    def __init__(self, engine: ReferenceEngine, folder) -> None:
        self.engine, self.folder, self.passes = engine, folder, 0

    def hidden_states(self, tokens: list[int]) -> dict:
        from pytest_miles.engines.sglang_dump import pass_files, read_points
        from tests.helpers.sglang_dump import sglang_pass, write_pass

        before = set(pass_files(self.folder))
        write_pass(self.folder, self.passes, sglang_pass(self.engine.hidden_states(tokens), tokens,
                                                         CFG.num_hidden_layers))
        self.passes += 1
        return read_points(self.folder, tokens, skip=before, num_layers=CFG.num_hidden_layers, wait=0)


def test_locator_through_the_sglang_dump_reader_names_a_trainer_fault(session, weights, tmp_path):
    """Engine side through the SGLang dump reader, trainer side megatron-core: the same weights
    agree at every point both sides have (the logits are not in SGLang's dump); a 1% scale planted
    in the trainer's layer 1 MLP down projection (negative control) is named at layer 1 mlp."""
    import shutil

    from safetensors.torch import load_file, save_file

    from pytest_miles.scenarios.locate import locate_engine_vs_trainer

    engine = _ReferenceInSGLangDumpLayout(ReferenceEngine(weights, deterministic=True), tmp_path / "dump")
    clean = locate_engine_vs_trainer(engine, session, TOKENS, tmp_path / "clean", tolerance=1e-4, plot=False)
    assert clean.first is None and len(clean.rows) == 12 and clean.only_one_side == ["logits"], clean.render()
    planted = tmp_path / "planted"
    shutil.copytree(weights, planted)
    f = next(planted.glob("*.safetensors"))
    state = load_file(f)
    state["model.layers.1.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"] * 1.01
    save_file(state, str(f))
    try:
        session.reset(planted)
        prof = locate_engine_vs_trainer(engine, session, TOKENS, tmp_path / "p", tolerance=1e-4, plot=False)
    finally:
        session.reset(weights)
    assert prof.first["name"] == "layers.1.mlp", prof.render()
    assert [r["name"] for r in prof.rows if r["max_abs"] > 1e-4] == ["layers.1.mlp", "layers.1.output", "final_norm"]
