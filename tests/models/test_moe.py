"""The mixture-of-experts shapes: Qwen3-MoE's HF layout (what SGLang's qwen3_moe.py class loads),
the embedded reference engine serving them, and the megatron-core MoE converter (bitwise round trip
in every experts layout)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from pytest_miles.errors import ConvertError  # noqa: E402
from pytest_miles.models.convert_moe import EXPERT_LAYOUTS, hf_to_megatron_moe, megatron_to_hf_moe  # noqa: E402
from pytest_miles.models.moe import MOE_SHAPES, MoeConfig, init_moe_weights, tensor_specs  # noqa: E402
from pytest_miles.models.shapes import SHAPES, config_of_dir, write_shape  # noqa: E402


def test_moe_shapes_are_data_beside_the_dense_ones():
    assert {"tiny", "tiny128", "qwen2.5-0.5b", "tiny-moe", "qwen3-30b-a3b-2l"} <= set(SHAPES)
    tiny = MOE_SHAPES["tiny-moe"]
    assert (tiny.num_hidden_layers, tiny.num_experts, tiny.num_experts_per_tok) == (2, 8, 2)
    big = MOE_SHAPES["qwen3-30b-a3b-2l"]  # Qwen3-30B-A3B's per-layer shape, 2 layers
    assert (big.hidden_size, big.num_experts, big.num_experts_per_tok, big.moe_intermediate_size) == (2048, 128, 8, 768)
    assert (big.num_attention_heads, big.num_key_value_heads, big.head_dim, big.num_hidden_layers) == (32, 4, 128, 2)
    specs = tensor_specs(big)  # names and shapes only: nothing is built
    assert specs["model.layers.1.mlp.gate.weight"] == (128, 2048)
    assert specs["model.layers.0.mlp.experts.127.down_proj.weight"] == (2048, 768)
    assert specs["model.layers.0.self_attn.q_proj.weight"] == (4096, 2048)


def test_tiny_moe_checkpoint_is_what_sglang_qwen3_moe_loads(tmp_path):
    d = write_shape(tmp_path / "m", "tiny-moe")
    raw = json.loads((d / "config.json").read_text())
    assert raw["architectures"] == ["Qwen3MoeForCausalLM"] and raw["model_type"] == "qwen3_moe"
    assert (raw["num_experts"], raw["num_experts_per_tok"], raw["norm_topk_prob"]) == (8, 2, True)
    assert raw["decoder_sparse_step"] == 1 and raw["mlp_only_layers"] == [] and raw["attention_bias"] is False
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for e in range(8):
        for w in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.mlp.experts.{e}.{w}.weight" in names
    assert {"model.layers.0.mlp.gate.weight", "model.layers.0.self_attn.q_norm.weight",
            "model.layers.0.self_attn.k_norm.weight"} <= names
    assert not any(n.endswith(".bias") for n in names)
    assert config_of_dir(d) == MOE_SHAPES["tiny-moe"]


def test_reference_engine_serves_the_moe_checkpoint(tmp_path):
    from pytest_miles.engines.base import SamplingParams
    from pytest_miles.engines.reference import ReferenceEngine

    d = write_shape(tmp_path / "m", "tiny-moe", dtype="float32")
    with ReferenceEngine(d) as a, ReferenceEngine(config=MOE_SHAPES["tiny-moe"]) as b:
        sp = SamplingParams(max_new_tokens=3, temperature=0)
        assert a.generate([[5, 6, 7]], sp) == b.generate([[5, 6, 7]], sp)  # file and seed agree
        record = a.routing([5, 6, 7, 8])
    assert (record.num_tokens, record.num_layers) == (4, 2)
    assert all(len(set(e)) == 2 and all(0 <= x < 8 for x in e) for t in record.experts for e in t)


@pytest.mark.parametrize("spec", ["local", "te"])
@pytest.mark.parametrize("layout", EXPERT_LAYOUTS)
def test_converter_round_trip_is_bitwise(layout, spec):
    cfg = MOE_SHAPES["tiny-moe"]
    hf = init_moe_weights(cfg)
    meg = hf_to_megatron_moe(hf, cfg, experts=layout, spec=spec)
    assert meg["decoder.layers.0.mlp.router.weight"] is hf["model.layers.0.mlp.gate.weight"]
    # TE's spec with experts fuses only the input norm (into linear_qkv); the pre-MLP and q/k norms stay TENorm
    fused = "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"
    assert (fused in meg, "decoder.layers.1.input_layernorm.weight" in meg) == (spec == "te", spec == "local")
    m = "decoder.layers.1"
    assert {f"{m}.pre_mlp_layernorm.weight", f"{m}.self_attention.q_layernorm.weight"} <= set(meg)
    back = megatron_to_hf_moe(meg, cfg, experts=layout, spec=spec)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) and back[k].dtype == hf[k].dtype for k in hf)


def test_grouped_layout_is_what_megatron_groupedmlp_reads():
    """GroupedMLP.forward views weight1 as [experts, hidden, 2 x ffn] and weight2 as [experts, ffn, hidden]."""
    cfg = MOE_SHAPES["tiny-moe"]
    hf = init_moe_weights(cfg)
    meg = hf_to_megatron_moe(hf, cfg, experts="grouped")
    w1 = meg["decoder.layers.1.mlp.experts.weight1"].view(8, cfg.hidden_size, -1)
    w2 = meg["decoder.layers.1.mlp.experts.weight2"].view(8, -1, cfg.hidden_size)
    x = "model.layers.1.mlp.experts.3"
    assert torch.equal(w1[3].t(), torch.cat((hf[f"{x}.gate_proj.weight"], hf[f"{x}.up_proj.weight"])))
    assert torch.equal(w2[3].t(), hf[f"{x}.down_proj.weight"])


def test_converter_names_what_is_wrong():
    cfg = MOE_SHAPES["tiny-moe"]
    meg = hf_to_megatron_moe(init_moe_weights(cfg), cfg)
    with pytest.raises(ConvertError, match="experts layout 'sparse'"):
        hf_to_megatron_moe({}, cfg, experts="sparse")
    extra = {**meg, "decoder.layers.0.mlp.experts.local_experts.8.linear_fc1.weight": torch.zeros(1)}
    with pytest.raises(ConvertError, match="unexpected key.*local_experts.8"):
        megatron_to_hf_moe(extra, cfg)
    with pytest.raises(ConvertError, match="missing 'decoder.layers.1.mlp.router.weight'"):
        megatron_to_hf_moe({k: v for k, v in meg.items() if "layers.1.mlp.router" not in k}, cfg)
    with pytest.raises(ConvertError, match="unexpected key.*input_layernorm.*'te' spec"):
        megatron_to_hf_moe({**hf_to_megatron_moe(init_moe_weights(cfg), cfg, spec="te"),
                            "decoder.layers.0.input_layernorm.weight": torch.zeros(1)}, cfg, spec="te")
    with pytest.raises(ConvertError, match="num_experts"):
        hf_to_megatron_moe({}, {"num_attention_heads": 2, "num_hidden_layers": 1, "hidden_size": 8})


def test_a_config_with_dense_layers_is_refused_by_name():
    from pytest_miles.models.moe import moe_config_from_hf

    raw = MoeConfig().hf_config()
    with pytest.raises(ValueError, match="mlp_only_layers"):
        moe_config_from_hf({**raw, "mlp_only_layers": [0]}, "x/config.json")
