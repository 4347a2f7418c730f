"""The HF Qwen2 <-> megatron-core converter: bitwise round trips for both layer specs, tied and
untied embeddings, GQA; the fused layouts checked against how megatron lays them out."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pytest_miles.models.convert import ConvertError, QwenShape, hf_to_megatron, megatron_to_hf  # noqa: E402
from pytest_miles.models.embedded import TinyConfig, init_weights  # noqa: E402


@pytest.mark.parametrize("spec", ["local", "te"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bitwise(spec, tied, dtype):
    cfg = TinyConfig(num_attention_heads=4, num_key_value_heads=2, hidden_size=64, tie_word_embeddings=tied)
    hf = {k: v.to(getattr(torch, dtype)) for k, v in init_weights(cfg).items()}
    meg = hf_to_megatron(hf, cfg, spec=spec)
    back = megatron_to_hf(meg, cfg, spec=spec)
    assert back.keys() == hf.keys()
    for k in hf:
        assert back[k].dtype == hf[k].dtype and torch.equal(back[k].view(torch.int16 if dtype == "bfloat16"
                                                                         else torch.int32),
                                                         hf[k].view(torch.int16 if dtype == "bfloat16"
                                                                    else torch.int32)), k
    assert ("output_layer.weight" in meg) is not tied
    again = hf_to_megatron(back, cfg, spec=spec)
    assert all(torch.equal(again[k], meg[k]) for k in meg)

def test_names_per_spec():
    cfg = TinyConfig(num_hidden_layers=1)
    local = hf_to_megatron(init_weights(cfg), cfg, spec="local")
    te = hf_to_megatron(init_weights(cfg), cfg, spec="te")
    assert "decoder.layers.0.input_layernorm.weight" in local and "decoder.layers.0.pre_mlp_layernorm.weight" in local
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te
    assert not any("layernorm.weight" in k and "final" not in k for k in te)
    # TE's fp8 bookkeeping is dropped on the way back, not mistaken for a weight
    te["decoder.layers.0.self_attention.linear_qkv._extra_state"] = object()
    assert "model.layers.0.input_layernorm.weight" in megatron_to_hf(te, cfg, spec="te")

def test_qkv_is_interleaved_per_query_group_as_megatron_lays_it_out():
    """Megatron's linear_qkv is [group 0: its q heads, k, v | group 1: ...] (what the TP split
    and SelfAttention.get_query_key_value_tensors expect), not [all q | all k | all v]."""
    cfg = TinyConfig(num_attention_heads=4, num_key_value_heads=2, hidden_size=8, intermediate_size=4,
                     num_hidden_layers=1, vocab_size=8)
    d, h = cfg.head_dim, cfg.hidden_size  # head_dim 2
    hf = init_weights(cfg)
    p = "model.layers.0.self_attn"
    hf[f"{p}.q_proj.weight"] = torch.arange(4 * d)[:, None].float().expand(4 * d, h) + 100  # q rows 100..
    hf[f"{p}.k_proj.weight"] = torch.arange(2 * d)[:, None].float().expand(2 * d, h) + 200
    hf[f"{p}.v_proj.weight"] = torch.arange(2 * d)[:, None].float().expand(2 * d, h) + 300
    qkv = hf_to_megatron(hf, cfg)["decoder.layers.0.self_attention.linear_qkv.weight"][:, 0].tolist()
    assert qkv == [100, 101, 102, 103, 200, 201, 300, 301,   # group 0: q heads 0-1, k head 0, v head 0
                   104, 105, 106, 107, 202, 203, 302, 303]   # group 1
    fc1 = hf_to_megatron(hf, cfg)["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:4], hf["model.layers.0.mlp.gate_proj.weight"])  # [gate; up]

def test_bad_input_is_named():
    cfg = TinyConfig(num_hidden_layers=1)
    hf = init_weights(cfg)
    with pytest.raises(ConvertError, match="spec 'fused': expected one of local, te"):
        hf_to_megatron(hf, cfg, spec="fused")
    del hf["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ConvertError, match="HF state dict: missing 'model.layers.0.mlp.up_proj.weight'"):
        hf_to_megatron(hf, cfg)
    meg = hf_to_megatron(init_weights(cfg), cfg)
    meg["decoder.layers.0.self_attention.core_attention.weird"] = torch.zeros(1)
    with pytest.raises(ConvertError, match="unexpected key"):
        megatron_to_hf(meg, cfg)
    with pytest.raises(ConvertError, match="num_hidden_layers"):
        QwenShape.of({"num_attention_heads": 2, "hidden_size": 8})
    with pytest.raises(ConvertError, match="not a multiple"):
        QwenShape.of({"num_attention_heads": 3, "num_key_value_heads": 2, "hidden_size": 6, "num_hidden_layers": 1})

def test_reads_an_hf_config_json_dict():
    cfg = TinyConfig(tie_word_embeddings=True)
    shape = QwenShape.of(cfg.hf_config())
    assert shape == QwenShape(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                              True)
