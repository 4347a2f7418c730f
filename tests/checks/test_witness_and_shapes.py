"""Witnesses against vacuous passes (engine settings read from the engine, the radix-cache hit),
SGLang's production command line (CUDA graphs on), and the embedded model shapes."""

from __future__ import annotations

import hashlib
import os

import pytest

pytest.importorskip("torch")

from pytest_miles import assert_batch_invariant  # noqa: E402
from pytest_miles.capabilities.verdict import NotApplicable  # noqa: E402
from pytest_miles.checks.batch_invariance import BATCH_SIZES, check_batch_invariance  # noqa: E402
from pytest_miles.checks.witness import SETTING_KEYS, radix_cache_witness  # noqa: E402
from pytest_miles.config.settings import BY_NAME  # noqa: E402
from pytest_miles.engines.reference import ReferenceEngine  # noqa: E402
from pytest_miles.engines.reference_server_engine import ReferenceServerEngine  # noqa: E402
from pytest_miles.engines.server import SGLangEngine  # noqa: E402
from pytest_miles.models.cache import cached_shape_dir  # noqa: E402
from pytest_miles.models.embedded import SHAPES, tensor_chunks, tensor_specs, write_hf_checkpoint, write_shape  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_reference_server_has_no_prefix_cache_so_radix_cache_is_not_applicable(model_dir, tmp_path):
    with ReferenceServerEngine(model_dir, deterministic=True, log_dir=tmp_path) as server:
        info = server.server_info()  # GET /get_server_info, as SGLang answers it
        assert info["disable_radix_cache"] is True and info["enable_deterministic_inference"] is True
        assert server.generate([[5, 6, 7]])[0].cached_tokens == 0
        with pytest.raises(NotApplicable) as exc:
            assert_batch_invariant(server, "radix_cache", 2, prompt_len=8)
        assert "reference-server reports disable_radix_cache=true" in str(exc.value)
        assert "no prefix cache" in str(exc.value)
        report = assert_batch_invariant(server, "single", 2, prompt_len=8)
        assert set(report.settings) >= set(SETTING_KEYS) - {"cuda_graph_max_bs"}
        assert "engine settings: attention_backend=torch-reference" in report.render()


def test_radix_cache_witness():
    on = {"disable_radix_cache": False}
    assert radix_cache_witness(on, [0, 64, 128], "sglang")[0] == "hit"
    status, why = radix_cache_witness(on, [0, 0], "sglang")
    assert status == "vacuous" and "two cold prefills" in why
    assert radix_cache_witness(on, [None, None], "sglang")[0] == "not_applicable"
    status, why = radix_cache_witness({"disable_radix_cache": True}, [0], "sglang")
    assert status == "not_applicable" and "disable_radix_cache=true" in why


def test_in_process_reference_reports_settings_in_every_mode():
    eng = ReferenceEngine(deterministic=True)
    report = check_batch_invariance(eng, "p_vs_d", 2, prompt_len=8)
    assert report.settings["attention_backend"] == "torch-reference" and report.shape["seq_len"] > 8


def test_single_and_needle_cross_cuda_graph_buckets():
    """SGLang 0.5.17 captures [1, 2, 4, 8, 12, 16, 24, 32, 40, ...]: sizes on both sides of each."""
    buckets = [1, 2, 4, 8, 12, 16, 24, 32, 40]
    first = BATCH_SIZES[:10]
    padded = {next(b for b in buckets if b >= s) for s in first}
    assert len(padded) >= 7 and any(s not in buckets for s in first) and any(s in buckets for s in first)
    eng = ReferenceEngine(deterministic=True)
    report = check_batch_invariance(eng, "needle", 4, max_batch=9, prompt_len=4)
    assert report.batch_sizes == [3, 5, 8, 9]
    single = check_batch_invariance(eng, "single", 3, prompt_len=4)  # it reports no CUDA graphs: 1..trials
    assert single.batch_sizes == [1, 2, 3] and "without CUDA graphs" in single.render()


def test_sglang_command_line_runs_cuda_graphs_unless_asked(model_dir, tmp_path):
    cmd = SGLangEngine(model_dir, log_dir=tmp_path).cmd
    assert "--enable-deterministic-inference" in cmd and "--disable-cuda-graph" not in cmd
    assert "--disable-cuda-graph" in SGLangEngine(model_dir, log_dir=tmp_path, disable_cuda_graph=True).cmd
    assert "--disable-cuda-graph" in SGLangEngine(model_dir, log_dir=tmp_path,
                                                  extra_args=["--sglang-disable-cuda-graph"]).cmd


def test_shapes():
    from pytest_miles.models.shapes import SHAPES as ALL_SHAPES

    assert set(BY_NAME["model_shape"].choices) == set(ALL_SHAPES)  # dense and mixture-of-experts
    assert set(SHAPES) < set(ALL_SHAPES)
    q = SHAPES["qwen2.5-0.5b"]
    hf = q.hf_config()
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["num_key_value_heads"],
            hf["intermediate_size"], hf["vocab_size"], hf["tie_word_embeddings"], hf["rope_theta"],
            hf["rms_norm_eps"]) == (896, 24, 14, 2, 4864, 151936, True, 1e6, 1e-6)
    specs = tensor_specs(q)
    assert "lm_head.weight" not in specs and specs["model.layers.0.self_attn.k_proj.weight"] == (128, 896)
    assert specs["model.layers.23.self_attn.q_proj.bias"] == (896,)
    total = sum(int.__mul__(*s) if len(s) == 2 else s[0] for s in specs.values())
    assert total == 494_032_768  # Qwen2.5-0.5B's parameter count (tied embeddings)
    t128 = SHAPES["tiny128"]
    assert t128.head_dim == 128 and t128.num_key_value_heads * t128.head_dim == 128 and t128.hidden_size % 128 == 0


def _digest(cfg, name):
    h = hashlib.sha256()
    for chunk in tensor_chunks(cfg, name, tensor_specs(cfg)[name]):
        h.update(chunk.numpy().tobytes())
    return h.hexdigest()


def test_realistic_shape_weights_are_seeded_per_tensor():
    """The 0.5B writer streams tensor by tensor; each tensor depends on (seed, name) only, so two
    of them can be checked here without writing the 1 GB file."""
    q = SHAPES["qwen2.5-0.5b"]
    k0 = _digest(q, "model.layers.0.self_attn.k_proj.weight")
    assert k0 == _digest(q, "model.layers.0.self_attn.k_proj.weight")
    assert k0 != _digest(q, "model.layers.1.self_attn.k_proj.weight")
    assert _digest(q, "model.norm.weight") == _digest(q, "model.norm.weight")


def test_tiny128_is_written_streamed_and_served(tmp_path):
    from safetensors import safe_open

    path = write_shape(tmp_path / "m", "tiny128")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(tensor_specs(SHAPES["tiny128"]))
        assert tuple(f.get_tensor("model.layers.1.self_attn.k_proj.weight").shape) == (128, 256)
    out = ReferenceEngine(path, deterministic=True).generate([[5, 6, 7]])[0]
    assert len(out.output_ids) > 0 and out.cached_tokens == 0


def test_one_shape_has_one_set_of_weights_however_written(tmp_path):
    """init_weights (the in-process reference, the drift measure, the converter) and the files
    written for the engines hold the same values for a shape other than tiny; tiny keeps its own."""
    import torch
    from safetensors.torch import load_file

    from pytest_miles.models.embedded import TinyConfig, init_weights

    cfg = SHAPES["tiny128"]
    written = load_file(str(write_hf_checkpoint(tmp_path / "a", cfg, dtype="float32") / "model.safetensors"))
    mem = init_weights(cfg)
    assert written.keys() == mem.keys() and all(torch.equal(written[k], mem[k]) for k in mem)
    tiny = init_weights(TinyConfig())
    assert not torch.equal(tiny["model.embed_tokens.weight"],
                           torch.cat(list(tensor_chunks(TinyConfig(), "model.embed_tokens.weight", (512, 128)))))


def test_the_05b_shape_logits_are_not_saturated():
    """A precision figure on a model whose logits saturate measures chaos (H100 2026-11-23, the tiny
    init on the 0.5B shape: logits std ~30, FP8 x bf16 44 nats end to end); the 0.5B shape's
    seeded weights keep the logits' spread in a few units."""
    import torch

    from pytest_miles.models.embedded import TinyDecoder, init_weights

    cfg = SHAPES["qwen2.5-0.5b"]
    model = TinyDecoder(cfg, init_weights(cfg))
    ids = torch.randint(3, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = model.step(ids, torch.arange(8)[None], torch.ones(1, 8, dtype=torch.bool), all_logits=True)
    spread = float(logits.float().std(-1).mean())
    assert 0.5 < spread < 5, spread


def test_shape_model_is_written_once_and_shared_by_workers(tmp_path, monkeypatch):
    worker = tmp_path / "popen-gw1"
    worker.mkdir()
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    first = cached_shape_dir(worker, "tiny")
    assert first == tmp_path / "miles-model-tiny"  # the basetemp root, shared by the workers
    stamp = os.stat(first / "model.safetensors").st_mtime_ns
    assert cached_shape_dir(tmp_path / "popen-gw0", "tiny") == first
    assert os.stat(first / "model.safetensors").st_mtime_ns == stamp
    with pytest.raises(ValueError, match="--miles-model-shape: 'huge' is not one of tiny, tiny128, qwen2.5-0.5b"):
        cached_shape_dir(worker, "huge")


def test_cost_pairs_are_interleaved_with_a_spread():
    from pytest_miles.engines.base import SamplingParams
    from pytest_miles.scenarios.cost import measure_rollout_cost

    det, base = ReferenceEngine(deterministic=True), ReferenceEngine()
    report = measure_rollout_cost(det, base, [[5, 6, 7, 8]] * 2, SamplingParams(max_new_tokens=2), pairs=3)
    figures = report.figures()
    assert figures["pairs"] == 3 and len(figures["deterministic_tok_s"]) == 3 and ".." in figures["cost_spread"]
    with pytest.raises(ValueError, match="pairs: 2 < 3"):
        measure_rollout_cost(det, base, [[5, 6]], SamplingParams(max_new_tokens=1), pairs=2)
