"""The block-wise FP8 MoE checkpoint on CPU: every expert of every layer quantized with the scales
SGLang's FusedMoE registers (stacked per layer as w13/w2), the router and the rest left bf16, the
dequantized weights within the E4M3 rounding of the bf16 ones, a shape SGLang would refuse refused by
name, and a broken checkpoint caught."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from pytest_miles.models.moe import MOE_SHAPES  # noqa: E402
from pytest_miles.models.quantized_checkpoints import QUANT_CONFIGS, dequantized_state  # noqa: E402
from pytest_miles.models.quantized_moe import (  # noqa: E402
    FP8_MOE_SHAPES,
    TINY128_MOE,
    check_moe_fp8_layout,
    expert_weight_names,
    fp8_moe_config,
    write_fp8_moe_checkpoints,
)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    bf16, fp8 = write_fp8_moe_checkpoints(tmp_path_factory.mktemp("fp8-moe"), "tiny128-moe")
    return bf16, fp8, load_file(str(bf16 / "model.safetensors")), load_file(str(fp8 / "model.safetensors"))


def _ceil(a: int) -> int:
    return -(-a // 128)


def test_every_expert_is_fp8_with_the_scales_sglang_registers(written):
    bf16, fp8, ref, state = written
    cfg = TINY128_MOE
    assert check_moe_fp8_layout(fp8, cfg) == []
    assert json.loads((fp8 / "config.json").read_text())["quantization_config"] == QUANT_CONFIGS["fp8_blockwise"]
    experts = expert_weight_names(cfg)
    assert len(experts) == cfg.num_hidden_layers * cfg.num_experts * 3
    h, f = cfg.hidden_size, cfg.moe_intermediate_size
    for name in experts:
        assert state[name].dtype == torch.float8_e4m3fn and state[name].shape == ref[name].shape, name
        scale = state[name + "_scale_inv"]
        assert scale.dtype == torch.float32 and tuple(scale.shape) == tuple(map(_ceil, ref[name].shape)), name
    # SGLang's FusedMoE (fp8.py create_fp8_moe_weight_): w13_weight_scale_inv [E, 2 x ceil(I/128), ceil(H/128)]
    # filled by gate (w1) then up (w3); w2_weight_scale_inv [E, ceil(H/128), ceil(I/128)]
    p = "model.layers.1.mlp.experts"
    w13 = torch.stack([torch.cat([state[f"{p}.{e}.{x}_proj.weight_scale_inv"] for x in ("gate", "up")])
                       for e in range(cfg.num_experts)])
    w2 = torch.stack([state[f"{p}.{e}.down_proj.weight_scale_inv"] for e in range(cfg.num_experts)])
    assert tuple(w13.shape) == (cfg.num_experts, 2 * _ceil(f), _ceil(h))
    assert tuple(w2.shape) == (cfg.num_experts, _ceil(h), _ceil(f))
    left = [k for k in state if k not in experts and not k.endswith("_scale_inv") and "self_attn" not in k
            or k.endswith("norm.weight")]
    assert left and all(state[k].dtype == torch.bfloat16 and k + "_scale_inv" not in state for k in left)
    assert all(f"model.layers.{n}.mlp.gate.weight" in left for n in range(cfg.num_hidden_layers))  # the routers


def test_dequantized_experts_are_the_bf16_weights_within_e4m3_rounding(written):
    _, fp8, ref, state = written
    deq = dequantized_state(fp8)
    for name in expert_weight_names(TINY128_MOE)[:12] + ["model.layers.0.self_attn.k_proj.weight"]:
        w = ref[name].float()
        s = state[name + "_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
        bound = torch.maximum(w.abs() * 2.0**-4, s * 2.0**-10)  # half an ulp: normals, subnormals
        assert ((deq[name] - w).abs() <= bound).all(), name
        assert not torch.equal(deq[name], w), f"{name}: no rounding at all (not quantized?)"
    assert torch.equal(deq["model.layers.0.mlp.gate.weight"], ref["model.layers.0.mlp.gate.weight"].float())


def test_a_shape_sglang_would_refuse_is_refused_by_name():
    assert set(FP8_MOE_SHAPES) == {"tiny128-moe", "qwen3-30b-a3b-2l"}
    assert fp8_moe_config("qwen3-30b-a3b-2l") is MOE_SHAPES["qwen3-30b-a3b-2l"]  # 768-wide experts tile
    with pytest.raises(ValueError, match=r"MoeConfig: .*moe_intermediate_size 64.*multiples of 128.*tiny128-moe"):
        fp8_moe_config(MOE_SHAPES["tiny-moe"])
    with pytest.raises(ValueError, match=r"'tiny-moe'.*expected a MoeConfig or one of tiny128-moe"):
        fp8_moe_config("tiny-moe")


def test_a_broken_checkpoint_is_caught(written, tmp_path):
    _, fp8, _, state = written
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((fp8 / "config.json").read_text())
    bad = dict(state)
    del bad["model.layers.1.mlp.experts.5.down_proj.weight_scale_inv"]
    bad["model.layers.0.mlp.gate.weight_scale_inv"] = torch.ones(1, 2)
    save_file(bad, str(broken / "model.safetensors"))
    problems = "\n".join(check_moe_fp8_layout(broken, TINY128_MOE))
    assert "model.layers.1.mlp.experts.5.down_proj.weight" in problems
    assert "model.layers.0.mlp.gate.weight: quantized" in problems
