"""Mixture of experts on the GPU host: SGLang serving the tiny-moe shape (Qwen3-MoE, SGLang's
qwen3_moe class) with --enable-deterministic-inference on triton and flashinfer, its routing twice
and against megatron-core's forward on the same weights (rollout vs trainer), and megatron-core's
MoE layer trained twice bitwise and resumed on CUDA; rollout routing replay (SGLang's routed experts
replayed in megatron-core's forward: the train-rollout gap with and without); the realistic shape
(qwen3-30b-a3b-2l: Qwen3-30B-A3B's layer, 2 layers, ~3.7 GB bf16 written here) in deterministic mode
and its flag-off control.

    python3 -m pytest tests/gpu/test_gpu_moe.py -v -s -rs -p no:cacheprovider --miles-require-gpu \
        --miles-report out/moe.json
"""

from __future__ import annotations

from dataclasses import asdict

import pytest

from pytest_miles import (
    assert_resume_equivalent,
    assert_routing_equal,
    assert_runs_bitwise_equal,
    compare_routing,
)
from pytest_miles.capabilities.verdict import KnownLimitation, NotApplicable
from pytest_miles.checks.batch_invariance import assert_batch_invariant, negative_control
from pytest_miles.engines.base import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]
MODES = {"single": 16, "needle": 8, "prefix": 8, "p_vs_d": 4}
TOKENS = [5, 17, 99, 3, 250, 41, 7, 300, 12, 64, 1, 2, 77, 140, 33, 208, 9, 10, 11, 400, 401, 13, 14, 15]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from pytest_miles.models.shapes import write_shape

    return write_shape(tmp_path_factory.mktemp("tiny-moe") / "m", "tiny-moe")


@pytest.fixture(scope="module")
def big_moe_dir(tmp_path_factory):
    from pytest_miles.models.shapes import write_shape

    return write_shape(tmp_path_factory.mktemp("qwen3-30b-a3b-2l") / "m", "qwen3-30b-a3b-2l")


def _sglang(engine_factory, moe_dir, backend, deterministic=True, extra=()):
    from pytest_miles.engines.routing import SERVER_FLAG

    eng = engine_factory("sglang", model=str(moe_dir), attention_backend=backend, deterministic=deterministic,
                         extra_args=(SERVER_FLAG, *extra))
    shape = moe_dir.parent.name.rstrip("0123456789")
    print(f"\nsglang [{backend}] {shape}, deterministic={deterministic}: up after {eng.startup_seconds:.1f} s")
    return eng


def _routing(eng):
    from pytest_miles.engines.routing import sglang_routing
    from pytest_miles.models.moe import MOE_SHAPES

    cfg = MOE_SHAPES["tiny-moe"]
    return sglang_routing(eng, TOKENS, cfg.num_hidden_layers, cfg.num_experts_per_tok)


def _serves(engine_factory, moe_dir, backend):
    eng = _sglang(engine_factory, moe_dir, backend)
    failed = _failing_modes(eng, tuple(MODES))
    first, second = _routing(eng), _routing(eng)
    print(assert_routing_equal(first, second).render())
    assert not failed, f"MoE modes failing with deterministic inference on: {failed}"


# The tests run in file order and the engine factory keeps one live configuration: those sharing an
# engine (tiny-moe on triton, deterministic) stand together.
def test_sglang_serves_tiny_moe_batch_invariant_and_routes_alike_twice_triton(engine_factory, moe_dir):
    _serves(engine_factory, moe_dir, "triton")


def test_routing_rollout_vs_trainer(engine_factory, moe_dir, tmp_path):
    from pytest_miles.models.moe import MOE_SHAPES
    from pytest_miles.trainers.megatron import MegatronTrainer, ModelArgs

    cfg = MOE_SHAPES["tiny-moe"]
    rollout = _routing(_sglang(engine_factory, moe_dir, "triton"))
    model = ModelArgs.qwen3_moe(cfg, seq_length=64)  # HF's rotate-half RoPE, as SGLang computes it
    with MegatronTrainer(seed=1, model=model, device="cuda", log_dir=tmp_path / "logs").session(
            init_hf=moe_dir, hf_config=asdict(cfg)) as session:
        (trainer,) = session.routing([{"tokens": TOKENS, "prompt_len": 4}])
    report = compare_routing(rollout, trainer)
    print(report.render(limit=20))
    agree = 1 - len(report.differences) / (report.tokens * report.layers)
    print(f"rollout (SGLang bf16) vs trainer (megatron-core fp32 from the same bf16 weights): {agree:.1%} agree")
    assert report.tokens == len(TOKENS) and agree >= 0.9, report.render()


def _replay(engine_factory, shape, hf, tmp_path):
    """R3: SGLang (bf16, deterministic, --enable-return-routed-experts) samples and records its experts;
    megatron-core (fp32 from the same bf16 weights) scores the samples without and with the replay."""
    from pytest_miles.engines.routing import sglang_routing
    from pytest_miles.models.moe import MOE_SHAPES
    from pytest_miles.scenarios.routing_replay import measure_routing_replay
    from pytest_miles.trainers.megatron import MegatronTrainer, ModelArgs

    cfg = MOE_SHAPES[shape]
    eng = _sglang(engine_factory, hf, "triton")
    params = SamplingParams(temperature=1.0, max_new_tokens=16, sampling_seed=7, ignore_eos=True)
    model = ModelArgs.qwen3_moe(cfg, seq_length=64)  # HF's rotate-half RoPE, as SGLang computes it
    with MegatronTrainer(seed=1, model=model, device="cuda", log_dir=tmp_path / "logs").session(
            init_hf=hf, hf_config=asdict(cfg)) as session:
        report = measure_routing_replay(
            eng, session, [TOKENS[:8], TOKENS[4:20], TOKENS[10:]], params=params,
            config={"model": shape, "rollout": "bf16", "train": "fp32", "backend": "triton", "tp": 1},
            routing=lambda t: sglang_routing(eng, t, cfg.num_hidden_layers, cfg.num_experts_per_tok))
    print(f"\n[{shape}] " + report.render())
    print(report.replayed.render())
    assert report.differ_replayed == 0, report.render()
    if report.differ_without:
        assert report.gap(True)[0] < report.gap(False)[0], report.render()
    else:  # routing already agreed: replay must not move a bit
        assert report.bitwise_same == 3 * 16, report.render()


def test_routing_replay_sglang_to_megatron_tiny_moe(engine_factory, moe_dir, tmp_path):
    _replay(engine_factory, "tiny-moe", moe_dir, tmp_path)


def test_sglang_moe_negative_control_flag_off(engine_factory, moe_dir):
    eng = _sglang(engine_factory, moe_dir, "triton", deterministic=False)
    try:
        report = negative_control(eng, "single", trials=16, params=SamplingParams(temperature=0.0, max_new_tokens=8))
    except AssertionError as exc:  # 2026-12-04 (H200): not caught on tiny-moe; caught on the realistic shape
        raise NotApplicable(f"vacuous on tiny-moe (tiny models hide batch variance): {exc}") from None
    print(report.render(limit=4))


def test_sglang_serves_tiny_moe_batch_invariant_and_routes_alike_twice_flashinfer(engine_factory, moe_dir):
    _serves(engine_factory, moe_dir, "flashinfer")


def test_megatron_moe_twice_bitwise_on_gpu(megatron_trainer_factory, tmp_path):
    a, b = (megatron_trainer_factory(seed=1234, model="tiny-moe", device="cuda").train(4, save_dir=tmp_path / f"r{i}")
            for i in (1, 2))
    assert a.device == "cuda"
    print(f"\nrun1 losses {a.losses}\nrun2 losses {b.losses}")
    assert_runs_bitwise_equal(a, b)


def test_megatron_moe_resume_on_gpu(megatron_trainer_factory, tmp_path):
    straight, _, resumed = assert_resume_equivalent(
        lambda **kw: megatron_trainer_factory(model="tiny-moe", device="cuda", **kw), 4, tmp_path, seed=99)
    print(f"\nstraight {straight.losses}\nresumed  {resumed.losses}")


def test_routing_replay_sglang_to_megatron_realistic_shape(engine_factory, big_moe_dir, tmp_path):
    _replay(engine_factory, "qwen3-30b-a3b-2l", big_moe_dir, tmp_path)


def test_realistic_moe_shape_deterministic_and_flag_off_control(engine_factory, big_moe_dir):
    """The negative control needs a realistic shape (tiny models hide batch variance): Qwen3-30B-A3B's layer."""
    eng = _sglang(engine_factory, big_moe_dir, "triton")
    failed = _failing_modes(eng, tuple(MODES))  # every mode, as issue 27 asks of both MoE shapes
    off = _sglang(engine_factory, big_moe_dir, "triton", deterministic=False)
    control = negative_control(off, "single", trials=16, params=SamplingParams(temperature=0.0, max_new_tokens=8))
    print(control.render(limit=4))
    assert not failed, f"qwen3-30b-a3b-2l modes failing with deterministic inference on: {failed}"


def test_realistic_moe_shape_flashinfer(engine_factory, big_moe_dir):
    """Qwen3-30B-A3B's layer on flashinfer, deterministic: every mode. On 2026-12-04 (H200,
    0.5.17) the server did not start: the capability data's `serve` cell. Where its start fails that way,
    the modes run with the prefill CUDA graphs off (decode graphs on) and the test XFAILs naming the cell."""
    from pytest_miles.capabilities import installed_sglang_version, load_capabilities
    from pytest_miles.errors import EngineError

    try:
        eng, limit = _sglang(engine_factory, big_moe_dir, "flashinfer"), None
    except EngineError as exc:
        limit = load_capabilities().lookup("flashinfer", "serve", installed_sglang_version())
        if not (limit.known and "Buffer overflow" in str(exc) + _log_of(exc)):
            raise
        print(f"{limit.describe()}\n  reproduced: {str(exc)[:600]}")
        eng = _sglang(engine_factory, big_moe_dir, "flashinfer", extra=("--cuda-graph-backend-prefill", "disabled"))
    failed = _failing_modes(eng, tuple(MODES))
    assert not failed, f"qwen3-30b-a3b-2l on flashinfer failing with deterministic inference on: {failed}"
    if limit is not None:
        pytest.xfail(f"known limitation: {limit.describe()} (modes checked with the prefill CUDA graphs off)")


def _failing_modes(eng, modes) -> list[str]:
    """Each mode checked and its verdict printed; the modes that failed (a known limitation or not
    applicable is the capability data's verdict, not a failure)."""
    failed = []
    for mode in modes:
        try:
            print(assert_batch_invariant(eng, mode=mode, trials=MODES[mode], max_batch=16).render())
        except (KnownLimitation, NotApplicable) as exc:
            print(f"{type(exc).__name__}: {exc}")
        except AssertionError as exc:
            print(exc)
            failed.append(mode)
    return failed


def _log_of(exc) -> str:
    """The server log a start failure names (its message carries only the tail)."""
    import re
    from pathlib import Path

    m = re.search(r"\(log (\S+?)\)", str(exc))
    return Path(m.group(1)).read_text(errors="replace") if m and Path(m.group(1)).exists() else ""
