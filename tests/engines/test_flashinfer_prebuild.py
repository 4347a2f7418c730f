"""FlashInfer's JIT modules built side by side while SGLang servers start
(engines/flashinfer_prebuild.py): which modules a server of a model and configuration meets, as
SGLang 0.5.17's FlashInfer backend derives them, what is left to the server and why, and the build
process as pytest meets it where FlashInfer is not installed. The builds themselves run on the GPU
host (docs/validation)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pytest_miles.engines.flashinfer_prebuild import Module, Prebuild, modules_for, plan, start_for
from pytest_miles.models.embedded import SHAPES

TINY = SHAPES["tiny"].hf_config()  # 2 heads, 1 KV head, head_dim 64: GQA group 2
QWEN = SHAPES["qwen2.5-0.5b"].hf_config()  # 14 heads, 2 KV heads, head_dim 64: GQA group 7
PREFILL = [Module("prefill", "auto", "bfloat16", 64), Module("prefill", "fa2", "bfloat16", 64)]
ALWAYS = [Module("norm"), Module("cascade")]  # every FlashInfer server built both (H200, 2026-12-04)


def test_determinism_off_on_a_small_gqa_group_meets_four_modules():
    mods, left = modules_for(TINY, deterministic=False, attention_backend="flashinfer", environ={})
    assert set(mods) == {*ALWAYS, Module("sampling"), *PREFILL, Module("decode", "", "bfloat16", 64)}
    assert left == []


def test_determinism_on_decodes_on_tensor_cores_and_samples_in_pytorch():
    mods, _ = modules_for(TINY, deterministic=True, attention_backend="flashinfer", environ={})
    assert mods == [*ALWAYS, *PREFILL]


def test_a_gqa_group_of_four_or_more_decodes_on_tensor_cores():
    mods, _ = modules_for(QWEN, deterministic=False, attention_backend="flashinfer", environ={})
    assert set(mods) == {*ALWAYS, Module("sampling"), *PREFILL}


def test_sglangs_tensor_core_override_is_followed():
    on, _ = modules_for(TINY, deterministic=False, attention_backend="flashinfer",
                        environ={"SGLANG_FLASHINFER_USE_TENSOR_CORE": "true"})
    off, _ = modules_for(QWEN, deterministic=False, attention_backend="flashinfer",
                         environ={"SGLANG_FLASHINFER_USE_TENSOR_CORE": "false"})
    assert not any(m.kind == "decode" for m in on)
    assert Module("decode", "", "bfloat16", 64) in off


@pytest.mark.parametrize("extra", [("--sampling-backend", "pytorch"), ("--sglang-sampling-backend=pytorch",)])
def test_another_sampling_backend_needs_no_sampling_module(extra):
    mods, _ = modules_for(QWEN, deterministic=False, attention_backend="flashinfer", extra_args=extra, environ={})
    assert mods == [*ALWAYS, *PREFILL]


def test_other_attention_backends_need_nothing():
    assert modules_for(TINY, deterministic=False, attention_backend="triton", environ={}) == (
        [], ["attention backend triton: not FlashInfer"])


@pytest.mark.parametrize("extra, config, why", [
    (("--kv-cache-dtype", "fp8_e4m3"), TINY, "a KV-cache dtype of its own"),
    (("--prefill-attention-backend", "fa3"), TINY, "prefill on fa3"),
    ((), {**TINY, "use_sliding_window": True}, "sliding-window"),
    ((), {**TINY, "layer_types": ["sliding_attention", "full_attention"]}, "sliding-window"),
    ((), {**TINY, "torch_dtype": "float32"}, "dtype float32"),
    ((), {k: v for k, v in TINY.items() if k != "num_attention_heads"}, "no attention head counts"),
])
def test_what_cannot_be_derived_for_certain_is_left_to_the_server(extra, config, why):
    mods, left = modules_for(config, deterministic=False, attention_backend="flashinfer", extra_args=extra,
                             environ={})
    assert mods == [*ALWAYS, Module("sampling")]  # neither depends on the attention layout
    assert len(left) == 1 and why in left[0]


def test_layers_all_of_full_attention_are_not_a_sliding_window():
    mods, left = modules_for({**QWEN, "layer_types": ["full_attention"] * 24}, deterministic=True,
                             attention_backend="flashinfer", environ={})
    assert mods == [*ALWAYS, *PREFILL] and left == []


def test_the_dtype_and_head_dim_are_read_as_sglang_reads_them():
    cfg = {**QWEN, "head_dim": 128, "torch_dtype": "float16"}
    mods, _ = modules_for(cfg, deterministic=True, attention_backend="flashinfer", environ={})
    assert mods[2:] == [Module("prefill", "auto", "float16", 128), Module("prefill", "fa2", "float16", 128)]
    mods, _ = modules_for(QWEN, deterministic=True, attention_backend="flashinfer", extra_args=("--dtype", "half"),
                          environ={})
    assert {m.dtype for m in mods[2:]} == {"float16"}


def test_several_servers_share_modules_once_each_prefill_first():
    mods, left = plan([(TINY, True, "flashinfer", (), None), (TINY, False, "flashinfer", (), None),
                       (TINY, False, "triton", (), None)], environ={})
    assert mods == [*PREFILL, Module("decode", "", "bfloat16", 64), *ALWAYS, Module("sampling")]
    assert left == ["attention backend triton: not FlashInfer"]


def test_each_server_plans_with_its_own_environment():
    on_tensor_cores = {"SGLANG_FLASHINFER_USE_TENSOR_CORE": "true"}
    mods, _ = plan([(TINY, False, "flashinfer", (), on_tensor_cores)], environ={})
    assert not any(m.kind == "decode" for m in mods)  # that server decodes on the FA2 prefill module


def test_no_prebuild_without_flashinfer_or_without_servers(tmp_path):
    pytest.importorskip("torch")
    if __import__("importlib").util.find_spec("flashinfer") is not None:
        pytest.skip("FlashInfer is installed here: the GPU host's validation covers the build")
    assert start_for([], kernel_cache_dir=None, log_dir=tmp_path) is None


def test_the_build_process_names_a_bad_argument():
    run = subprocess.run([sys.executable, "-m", "pytest_miles.engines.flashinfer_prebuild", "not json"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert "expected one argument, a JSON list of modules" in run.stderr


def test_the_build_process_reports_when_flashinfer_is_missing(tmp_path):
    if __import__("importlib").util.find_spec("flashinfer") is not None:
        pytest.skip("FlashInfer is installed here")
    pb = Prebuild([Module("sampling")], env={**__import__("os").environ}, log_path=tmp_path / "pb.log",
                  left=["attention modules: a KV-cache dtype of its own"])
    pb.proc.wait(timeout=120)
    assert pb.finished() and pb.seconds is not None
    rows = pb.results()
    assert len(rows) == 1 and rows[0]["state"].startswith("failed: not installed")
    assert "failed: not installed" in pb.summary()
    assert pb.summary().endswith("left to the servers: attention modules: a KV-cache dtype of its own")
    pb.stop()  # a finished process: nothing to kill, and no error
    assert json.loads((tmp_path / "pb.log").read_text().splitlines()[0])["module"] == "*"
