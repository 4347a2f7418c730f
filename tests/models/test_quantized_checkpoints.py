"""The FP8 block-wise and MXFP8 HF writers on CPU: configs and tensors as SGLang's fp8.py loads
them (its own parser where sglang is importable), dequantized weights within the quantizer's
error of the bf16 ones, UE8M0 scales, seed 004's skip list, and a broken checkpoint caught."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from pytest_miles.facts.hardware import parse_override  # noqa: E402
from pytest_miles.models.embedded import TinyConfig  # noqa: E402
from pytest_miles.models.quantized_checkpoints import (  # noqa: E402
    TINY128,
    check_sglang_layout,
    dequantized_state,
    quantized_names,
    serve_unsupported,
    write_quantized_checkpoint,
)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    from pytest_miles.models.embedded import write_hf_checkpoint

    root = tmp_path_factory.mktemp("quantized")
    write_quantized_checkpoint(root / "fp8", "fp8_blockwise")
    ref = load_file(str(write_hf_checkpoint(root / "bf16", TINY128) / "model.safetensors"))
    write_quantized_checkpoint(root / "mxfp8", "mxfp8")
    return root, ref


def _within_quantizer_error(name, deq, w, scale, block):
    """E4M3 rounding: half an ulp, 2^-4 relative for normals, 2^-10 x scale for subnormals; plus
    saturation at 448 x scale (MXFP8's power-of-two scale leaves amax/scale in [256, 512): OCP MX clamps)."""
    s = scale.float().repeat_interleave(block[0], 0)[: w.shape[0]].repeat_interleave(block[1], 1)[:, : w.shape[1]]
    bound = torch.maximum(w.abs() * 2.0**-4, s * 2.0**-10) + (w.abs() - 448 * s).clamp(min=0)
    excess = (deq - w).abs() - bound
    assert excess.max() <= 0, f"{name}: {excess.max().item()} over the E4M3 rounding bound"


def test_fp8_blockwise_layout(written):
    root, ref = written
    path = root / "fp8"
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head", "model.embed_tokens"]}
    state = load_file(str(path / "model.safetensors"))
    assert check_sglang_layout(path) == []
    for name, t in state.items():
        if name.endswith("_scale_inv"):
            continue
        if any(f".{lin}.weight" in name for lin in LINEARS):
            scale = state[name + "_scale_inv"]
            assert t.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
            assert tuple(scale.shape) == (t.shape[0] // 128, t.shape[1] // 128)
        else:  # embeddings, lm_head, norms, biases stay bf16 and bitwise the bf16 checkpoint's
            assert t.dtype == torch.bfloat16 and torch.equal(t, ref[name]), name
    assert tuple(state["model.layers.0.self_attn.k_proj.weight_scale_inv"].shape) == (1, 2)


def test_fp8_dequantized_within_the_quantizer_error(written):
    root, ref = written
    state, deq = load_file(str(root / "fp8" / "model.safetensors")), dequantized_state(root / "fp8")
    for name in quantized_names(ref, "fp8_blockwise"):
        _within_quantizer_error(name, deq[name], ref[name].float(), state[name + "_scale_inv"], (128, 128))
        assert not torch.equal(deq[name], ref[name].float()), f"{name}: not quantized at all"


def test_mxfp8_layout_of_seed_004(written):
    root, ref = written
    path = root / "mxfp8"
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "mxfp8", "fmt": "e4m3", "weight_block_size": [1, 32], "scale_fmt": "ue8m0",
                  "activation_scheme": "dynamic"}
    assert check_sglang_layout(path) == []
    state, deq = load_file(str(path / "model.safetensors")), dequantized_state(path)
    names = quantized_names(ref, "mxfp8")
    assert sorted(names) == sorted(f"model.layers.{i}.{'mlp' if p in MLP else 'self_attn'}.{p}.weight"
                                   for i in range(2) for p in LINEARS)
    for name in names:
        scale = state[name + "_scale_inv"]
        assert scale.dtype == torch.uint8 and tuple(scale.shape) == (ref[name].shape[0], ref[name].shape[1] // 32)
        # UE8M0: a biased exponent, 2^(s - 127) a power of two; 255 is NaN in the format.
        assert int(scale.max()) < 255
        _within_quantizer_error(name, deq[name], ref[name].float(), torch.exp2(scale.float() - 127), (1, 32))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_proj.bias"):
        assert state[name].dtype == torch.bfloat16 and name + "_scale_inv" not in state


def test_block_fp8_refuses_a_shape_that_does_not_tile(tmp_path):
    with pytest.raises(ValueError,
                       match=r"multiples of 128; not: model\.layers\.0\.self_attn\.k_proj\.weight \(64, 128\)"):
        write_quantized_checkpoint(tmp_path / "m", "fp8_blockwise", TinyConfig())
    with pytest.raises(ValueError, match="fmt 'int8': expected one of fp8_blockwise, mxfp8"):
        write_quantized_checkpoint(tmp_path / "m", "int8")


def test_layout_check_catches_a_broken_checkpoint(written, tmp_path):
    """Negative control: the checker is not vacuous."""
    import shutil

    root, _ = written
    bad = shutil.copytree(root / "fp8", tmp_path / "bad")
    state = load_file(str(bad / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight_scale_inv"]
    key = "model.layers.0.mlp.down_proj.weight_scale_inv"
    state[key] = state[key].T.contiguous()
    save_file(state, str(bad / "model.safetensors"))
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["activation_scheme"] = "static"
    (bad / "config.json").write_text(json.dumps(cfg))
    problems = check_sglang_layout(bad)
    assert any("up_proj.weight: FP8 without" in p for p in problems), problems
    assert any("down_proj.weight_scale_inv: torch.float32 (4, 2), SGLang registers torch.float32 (2, 4)" in p
               for p in problems), problems
    assert any("activation_scheme 'static'" in p for p in problems), problems


def test_sglang_parses_the_configs(written):
    """SGLang's own Fp8Config.from_config (GPU host: sglang installed)."""
    pytest.importorskip("sglang.srt.layers.quantization.fp8",
                        reason="sglang not importable: the schema check above stands in")
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS

    from pytest_miles.models.quantized_checkpoints import sglang_fp8_config

    root, _ = written
    assert "fp8" in QUANTIZATION_METHODS
    fp8 = sglang_fp8_config(root / "fp8")
    assert fp8.weight_block_size == [128, 128] and fp8.is_checkpoint_fp8_serialized
    assert not getattr(fp8, "use_mxfp8", False)
    if "mxfp8" not in QUANTIZATION_METHODS or not hasattr(fp8, "use_mxfp8"):
        pytest.xfail("this SGLang knows no quant_method 'mxfp8' (sglang/srt/layers/quantization/__init__.py "
                     "QUANTIZATION_METHODS, fp8.py Fp8Config.use_mxfp8): seed 004's MXFP8 layout needs a newer SGLang")
    mx = sglang_fp8_config(root / "mxfp8")
    assert mx.use_mxfp8 and mx.weight_block_size == [1, 32]


def test_mxfp8_is_served_on_blackwell_only():
    assert "mxfp8 needs blackwell" in serve_unsupported("mxfp8", parse_override("h100"))
    assert serve_unsupported("mxfp8", parse_override("b200")) is None
    assert serve_unsupported("fp8_blockwise", parse_override("h100")) is None
