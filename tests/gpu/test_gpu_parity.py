"""Train-rollout parity and the divergence locator on the GPU, tiny128 in bf16, one megatron-core
session (TransformerEngine bf16 where it is importable, else the local spec) for the module.

- parity: SGLang (deterministic, production settings: CUDA graphs on) samples seeded prompts and
  recomputes them by prefill; the trainer scores the same ids on the same weights. Prints the parity
  report (identity first, then mean/max |delta|, first token vs rest, confidence buckets, K3-KL,
  bitwise equal, by position) and writes one report JSON per run beside --miles-report (or in the
  test's tmp dir) for `pytest-miles parity-budget`; unbudgeted until such a budget is checked in.
- locator: a second SGLang server with its debug tensor dump on (CUDA graphs and radix cache off;
  `engine_factory("sglang", dump_hidden_states=True)`, shared by the two locator tests) prefills one
  sequence; its per-layer outputs are compared with the trainer's forward hooks on the same ids:
  the layer profile is printed and recorded, and a fault planted in the trainer's layer 1 MLP is
  named at layer 1 mlp.
Each test starts at most one SGLang engine (the engine factory keeps one live per configuration).

Run on the H200 (after `scripts/gpu-host.sh install`, and te-stash/te-install for the TE trainer):
`scripts/gpu-host.sh parity locate` (one device call each, logs and reports under $OUT), or the
whole module: `python -m pytest -p no:cacheprovider tests/gpu/test_gpu_parity.py -v -s -rs
--miles-require-gpu --miles-report /tmp/parity/report.json`
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(480)]  # each test well under 8 minutes
RUNS = 5  # one report per sampling seed: what a budget is calibrated from
TE = importlib.util.find_spec("transformer_engine") is not None


def _out_dir(request, tmp_path) -> Path:
    report = request.config.getoption("--miles-report", default=None)
    return Path(report).parent / "parity" if report else tmp_path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from pytest_miles.models.embedded import write_hf_checkpoint
    from pytest_miles.models.quantized_checkpoints import TINY128

    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny128") / "bf16", TINY128, dtype="bfloat16")


@pytest.fixture(scope="module")
def session(rl_loop_factory, weights):
    from pytest_miles.models.quantized_checkpoints import TINY128
    from pytest_miles.trainers.config import ModelArgs

    trainer = rl_loop_factory.make_trainer(
        seed=1, model=ModelArgs.qwen2(TINY128, seq_length=64),
        **({"transformer_impl": "transformer_engine", "precision": "bf16"} if TE else {}))
    with trainer.session(init_hf=weights, hf_config=asdict(TINY128)) as s:
        yield s


def test_sglang_vs_megatron_core_tiny128_bf16(engine_factory, session, weights, miles_record, request, tmp_path):
    from pytest_miles import assert_parity
    from pytest_miles.engines.base import SamplingParams
    from pytest_miles.errors import Unbudgeted
    from pytest_miles.models.quantized_checkpoints import TINY128
    from pytest_miles.scenarios.loop.run import LoopConfig, prompts_for
    from pytest_miles.scenarios.parity import measure_parity

    engine = engine_factory("sglang", model=str(weights), deterministic=True)
    backend = engine.server_info().get("attention_backend")
    key = {"model": "tiny128", "rollout": "bf16", "train": "bf16", "backend": str(backend), "tp": 1}
    out = _out_dir(request, tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for run in range(RUNS):
        prompts = prompts_for(LoopConfig(seed=100 + run, vocab_size=TINY128.vocab_size, prompt_len=(8, 24)), 1)
        params = SamplingParams(temperature=1.0, max_new_tokens=32, sampling_seed=run, ignore_eos=True)
        report = measure_parity(engine, session, prompts, params=params, config=key, plot=out / f"parity-{run}.png")
        (out / f"parity-{run}.json").write_text(json.dumps(report.to_json()))
        print(f"\nrun {run} ({'TE' if TE else 'local'} trainer):\n{report.render()}")
        assert not report.identity, report.render()
        reports.append(report)
    f = reports[0].pairs["train_vs_decode"]
    miles_record(
        "train-rollout parity, SGLang vs megatron-core, tiny128 bf16",
        mean_abs=f.mean_abs,
        max_abs=f.max_abs,
        first_token=f.first_token_mean_abs,
        rest=f.rest_mean_abs,
        k3_kl=f.k3_kl,
        bitwise_equal=f"{f.bitwise_equal}/{f.tokens}",
        reports=str(out),
    )
    print(f"\nbudget from these runs: pytest-miles parity-budget {out}/parity-*.json")
    try:
        assert_parity(reports[0])
    except Unbudgeted as exc:
        pytest.skip(str(exc))


def _tokens() -> list[int]:
    from pytest_miles.models.quantized_checkpoints import TINY128
    from pytest_miles.scenarios.loop.run import LoopConfig, prompts_for

    return list(prompts_for(LoopConfig(seed=7, vocab_size=TINY128.vocab_size, prompt_len=(24, 32)), 1)[0])


def _dump_engine(engine_factory, weights):
    engine = engine_factory("sglang", model=str(weights), deterministic=True, dump_hidden_states=True)
    assert engine.name == "sglang-dump" and hasattr(engine, "hidden_states"), engine
    return engine


def test_locate_sglang_vs_megatron_core_tiny128_bf16(engine_factory, session, weights, miles_record, request,
                                                     tmp_path):
    """The layer profile of SGLang vs megatron-core on the same ids and bf16 weights: every decoder
    layer compared; the embedding rows are the same bf16 weights looked up by the same ids, so they
    agree exactly (a shifted or reordered sequence would not)."""
    from pytest_miles.models.quantized_checkpoints import TINY128
    from pytest_miles.scenarios.locate import locate_engine_vs_trainer

    engine = _dump_engine(engine_factory, weights)
    out = _out_dir(request, tmp_path) / "locator"
    out.mkdir(parents=True, exist_ok=True)
    prof = locate_engine_vs_trainer(engine, session, _tokens(), out, tolerance=0.0)
    print(f"\n({'TE' if TE else 'local'} trainer)\n{prof.render()}")
    (out / "layers.json").write_text(json.dumps(prof.to_json()))
    names = {r["name"] for r in prof.rows}
    wanted = {"embedding", "final_norm"} | {f"layers.{n}.{s}" for n in range(TINY128.num_hidden_layers)
                                            for s in ("attention", "mlp", "output")}
    assert wanted <= names, f"points not compared: {sorted(wanted - names)}\n{prof.render()}"
    assert prof.rows[0]["name"] == "embedding" and prof.rows[0]["max_abs"] == 0.0, prof.render()
    miles_record("divergence locator, SGLang vs megatron-core, tiny128 bf16", answer=prof.answer(),
                 points=len(prof.rows), profile=str(out / "layers.json"))


def test_locate_names_a_fault_planted_in_the_trainers_layer_1(engine_factory, session, weights, tmp_path):
    """Negative control: layer 1's MLP down projection scaled in the trainer's weights, by a factor
    that makes its change 20 times the largest clean SGLang-vs-trainer gap; with the tolerance at
    twice that gap, the locator names layer 1 mlp (every point before it is as in the clean run)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from pytest_miles.scenarios.locate import locate_engine_vs_trainer

    engine = _dump_engine(engine_factory, weights)
    tokens = _tokens()
    clean = locate_engine_vs_trainer(engine, session, tokens, tmp_path / "clean", plot=False)
    gap = max(r["max_abs"] for r in clean.rows)
    mlp = float(engine.hidden_states(tokens)["layers.1.mlp"].float().abs().max())
    factor = max(2.0, 1.0 + 20.0 * max(gap, 1e-3) / max(mlp, 1e-6))
    planted = tmp_path / "planted"
    shutil.copytree(weights, planted)
    f = next(planted.glob("*.safetensors"))
    state = load_file(f)
    name = "model.layers.1.mlp.down_proj.weight"
    state[name] = (state[name].float() * factor).to(state[name].dtype)
    save_file(state, str(f))
    try:
        session.reset(planted)
        prof = locate_engine_vs_trainer(engine, session, tokens, tmp_path / "p", tolerance=2.0 * gap)
    finally:
        session.reset(weights)
    print(f"\nplanted x{factor:.3g} (clean gap {gap:.3g}, layer 1 mlp max {mlp:.3g}):\n{prof.render()}")
    assert prof.first is not None and prof.first["name"] == "layers.1.mlp", prof.render()
