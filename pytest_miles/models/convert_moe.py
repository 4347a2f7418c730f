"""The Qwen3-MoE mapping between HF names and megatron-core's MoE layer (local spec names).

Attention as in the dense mapping (`convert.py`: q, k, v fused per query group) plus Qwen3's
per-head q/k norms (`q_layernorm`, `k_layernorm`). The MLP is an `MoELayer`: the router weight
(`mlp.router.weight`, [experts, hidden], HF's `mlp.gate.weight`) and the experts in one of
megatron-core's layouts:
- "local": `SequentialMLP`, one MLP per expert (`mlp.experts.local_experts.E.linear_fc1.weight`
  = [gate; up], `linear_fc2.weight` = down);
- "te_grouped": `TEGroupedMLP` (`mlp.experts.linear_fc1.weightE`, `linear_fc2.weightE`);
- "grouped": the legacy `GroupedMLP`: `weight1` [hidden, E x 2 x ffn], read by megatron-core as
  E blocks of [hidden, 2 x ffn] (each expert's fc1 transposed), `weight2` [E x ffn, hidden]
  (each expert's fc2 transposed).

`spec="te"`: megatron-core's TransformerEngine layer spec with experts (`get_gpt_layer_with_transformer_engine_spec(
num_experts=...)`, what Miles trains MoE with) fuses the input norm into `linear_qkv` (`layer_norm_weight`); the
pre-MLP norm, the q/k norms and the router stay modules of their own (an MoE layer cannot take a fused norm)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pytest_miles.errors import ConvertError
from pytest_miles.models.convert import QwenShape, _fuse_qkv, _spec, _split_qkv, _take

EXPERT_LAYOUTS = ("local", "te_grouped", "grouped")


def _layout(experts: str) -> str:
    if experts not in EXPERT_LAYOUTS:
        raise ConvertError(f"experts layout {experts!r}: expected one of {', '.join(EXPERT_LAYOUTS)}")
    return experts


def _num_experts(config: Any) -> int:
    e = config.get("num_experts") if isinstance(config, Mapping) else getattr(config, "num_experts", None)
    if not e:
        raise ConvertError("config: missing 'num_experts' (a Qwen3-MoE config.json or MoeConfig is accepted)")
    return int(e)


def _input_norm(m: str, spec: str) -> str:
    return f"{m}.self_attention.linear_qkv.layer_norm_weight" if spec == "te" else f"{m}.input_layernorm.weight"


def _attention_to_megatron(state, h: str, m: str, s: QwenShape, out: dict) -> None:
    att = {x: _take(state, f"{h}.self_attn.{x}_proj.weight", "HF") for x in "qkv"}
    out[f"{m}.self_attention.linear_qkv.weight"] = _fuse_qkv(att["q"], att["k"], att["v"], s)
    out[f"{m}.self_attention.linear_proj.weight"] = _take(state, f"{h}.self_attn.o_proj.weight", "HF")
    out[f"{m}.self_attention.q_layernorm.weight"] = _take(state, f"{h}.self_attn.q_norm.weight", "HF")
    out[f"{m}.self_attention.k_layernorm.weight"] = _take(state, f"{h}.self_attn.k_norm.weight", "HF")


def hf_to_megatron_moe(state: Mapping[str, Any], config: Any, experts: str = "local",
                       spec: str = "local") -> dict[str, Any]:
    """HF Qwen3-MoE names -> GPTModel (MoE, `spec` layer spec) names, experts in `experts` layout."""
    import torch

    layout, s, ne, spec = _layout(experts), QwenShape.of(config), _num_experts(config), _spec(spec)
    out = {"embedding.word_embeddings.weight": _take(state, "model.embed_tokens.weight", "HF")}
    for n in range(s.num_layers):
        h, m = f"model.layers.{n}", f"decoder.layers.{n}"
        out[_input_norm(m, spec)] = _take(state, f"{h}.input_layernorm.weight", "HF")
        _attention_to_megatron(state, h, m, s, out)
        out[f"{m}.pre_mlp_layernorm.weight"] = _take(state, f"{h}.post_attention_layernorm.weight", "HF")
        out[f"{m}.mlp.router.weight"] = _take(state, f"{h}.mlp.gate.weight", "HF")
        fc1, fc2 = [], []
        for e in range(ne):
            x = f"{h}.mlp.experts.{e}"
            fc1.append(
                torch.cat((_take(state, f"{x}.gate_proj.weight", "HF"), _take(state, f"{x}.up_proj.weight", "HF")), 0)
            )
            fc2.append(_take(state, f"{x}.down_proj.weight", "HF"))
        if layout == "local":
            for e in range(ne):
                out[f"{m}.mlp.experts.local_experts.{e}.linear_fc1.weight"] = fc1[e]
                out[f"{m}.mlp.experts.local_experts.{e}.linear_fc2.weight"] = fc2[e]
        elif layout == "te_grouped":
            for e in range(ne):
                out[f"{m}.mlp.experts.linear_fc1.weight{e}"] = fc1[e]
                out[f"{m}.mlp.experts.linear_fc2.weight{e}"] = fc2[e]
        else:
            hidden = fc1[0].shape[1]
            out[f"{m}.mlp.experts.weight1"] = torch.stack([w.t() for w in fc1]).contiguous().view(hidden, -1)
            out[f"{m}.mlp.experts.weight2"] = torch.stack([w.t() for w in fc2]).contiguous().view(-1, hidden)
    out["decoder.final_layernorm.weight"] = _take(state, "model.norm.weight", "HF")
    if not s.tied:
        out["output_layer.weight"] = _take(state, "lm_head.weight", "HF")
    return out


def _experts_to_hf(state, m: str, ne: int, layout: str) -> list[tuple[Any, Any]]:
    """(fc1, fc2) per expert from megatron's layout."""
    if layout == "local":
        return [
            (
                _take(state, f"{m}.mlp.experts.local_experts.{e}.linear_fc1.weight", "megatron"),
                _take(state, f"{m}.mlp.experts.local_experts.{e}.linear_fc2.weight", "megatron"),
            )
            for e in range(ne)
        ]
    if layout == "te_grouped":
        return [
            (
                _take(state, f"{m}.mlp.experts.linear_fc1.weight{e}", "megatron"),
                _take(state, f"{m}.mlp.experts.linear_fc2.weight{e}", "megatron"),
            )
            for e in range(ne)
        ]
    w1, w2 = _take(state, f"{m}.mlp.experts.weight1", "megatron"), _take(state, f"{m}.mlp.experts.weight2", "megatron")
    hidden = w1.shape[0]
    if w1.shape[1] % (2 * ne) or w2.shape[0] % ne or w2.shape[1] != hidden:
        raise ConvertError(
            f"{m}.mlp.experts: weight1 {tuple(w1.shape)} / weight2 {tuple(w2.shape)} do not hold "
            f"{ne} experts of [gate; up] (hidden {hidden})"
        )
    g1, g2 = w1.contiguous().view(ne, hidden, -1), w2.contiguous().view(ne, -1, hidden)
    return [(g1[e].t().contiguous(), g2[e].t().contiguous()) for e in range(ne)]


def _expert_keys(m: str, ne: int, layout: str) -> list[str]:
    if layout == "local":
        return [f"{m}.mlp.experts.local_experts.{e}.linear_fc{i}.weight" for e in range(ne) for i in (1, 2)]
    if layout == "te_grouped":
        return [f"{m}.mlp.experts.linear_fc{i}.weight{e}" for e in range(ne) for i in (1, 2)]
    return [f"{m}.mlp.experts.weight1", f"{m}.mlp.experts.weight2"]


def megatron_to_hf_moe(state: Mapping[str, Any], config: Any, experts: str = "local",
                       spec: str = "local") -> dict[str, Any]:
    """GPTModel (MoE, `spec` layer spec) names -> HF Qwen3-MoE names; `_extra_state` dropped; an
    unknown megatron name is a ConvertError naming it."""
    layout, s, ne, spec = _layout(experts), QwenShape.of(config), _num_experts(config), _spec(spec)
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    used: set[str] = set()

    def take(key: str):
        used.add(key)
        return _take(state, key, "megatron")

    out = {"model.embed_tokens.weight": take("embedding.word_embeddings.weight")}
    for n in range(s.num_layers):
        h, m = f"model.layers.{n}", f"decoder.layers.{n}"
        out[f"{h}.input_layernorm.weight"] = take(_input_norm(m, spec))
        q, k, v = _split_qkv(take(f"{m}.self_attention.linear_qkv.weight"), s)
        out.update(
            {f"{h}.self_attn.q_proj.weight": q, f"{h}.self_attn.k_proj.weight": k, f"{h}.self_attn.v_proj.weight": v}
        )
        out[f"{h}.self_attn.o_proj.weight"] = take(f"{m}.self_attention.linear_proj.weight")
        out[f"{h}.self_attn.q_norm.weight"] = take(f"{m}.self_attention.q_layernorm.weight")
        out[f"{h}.self_attn.k_norm.weight"] = take(f"{m}.self_attention.k_layernorm.weight")
        out[f"{h}.post_attention_layernorm.weight"] = take(f"{m}.pre_mlp_layernorm.weight")
        out[f"{h}.mlp.gate.weight"] = take(f"{m}.mlp.router.weight")
        used.update(_expert_keys(m, ne, layout))
        for e, (fc1, fc2) in enumerate(_experts_to_hf(state, m, ne, layout)):
            if fc1.shape[0] % 2:
                raise ConvertError(f"{m}.mlp.experts expert {e}: fc1 has {fc1.shape[0]} rows, expected [gate; up]")
            gate, up = fc1.chunk(2, dim=0)
            x = f"{h}.mlp.experts.{e}"
            out[f"{x}.gate_proj.weight"], out[f"{x}.up_proj.weight"] = gate.contiguous(), up.contiguous()
            out[f"{x}.down_proj.weight"] = fc2
    out["model.norm.weight"] = take("decoder.final_layernorm.weight")
    if not s.tied:
        out["lm_head.weight"] = take("output_layer.weight")
    extra = sorted(set(state) - used)
    if extra:
        raise ConvertError(
            f"megatron state dict: unexpected key(s) {', '.join(extra[:5])} for the {layout!r} "
            f"experts layout with {ne} experts and the {spec!r} spec: not this Qwen3-MoE GPTModel"
        )
    return out
