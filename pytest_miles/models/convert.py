"""The Qwen2 mapping. Megatron fuses q, k and v into one `linear_qkv` laid out per query group
(the group's query heads, then its key head, then its value head: what the TP split needs), and
gate/up into one `linear_fc1` ([gate; up]). The TransformerEngine spec moves the two pre-norms
into those fused layers (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pytest_miles.errors import ConvertError  # noqa: F401  (importable here too)

SPECS = ("local", "te")


@dataclass(frozen=True)
class QwenShape:
    """The numbers the mapping needs, read from an HF config (dict or object with attributes)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def of(cls, config: Any) -> QwenShape:
        if isinstance(config, QwenShape):
            return config

        def get(name, default=None):
            v = config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)
            if v is None:
                raise ConvertError(f"config: missing {name!r} (an HF Qwen2 config.json or TinyConfig is accepted)")
            return v

        heads = int(get("num_attention_heads"))
        kv = int(get("num_key_value_heads", heads))
        hd = (config.get("head_dim") if isinstance(config, Mapping) else getattr(config, "head_dim", None))
        hd = int(hd or int(get("hidden_size")) // heads)
        if heads % kv:
            raise ConvertError(f"config: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        return cls(int(get("num_hidden_layers")), heads, kv, hd, bool(get("tie_word_embeddings", False)))


def _spec(spec: str) -> str:
    if spec not in SPECS:
        raise ConvertError(f"spec {spec!r}: expected one of {', '.join(SPECS)}")
    return spec


def _norm_keys(spec: str, n: int) -> tuple[str, str]:
    p = f"decoder.layers.{n}"
    if spec == "te":
        return f"{p}.self_attention.linear_qkv.layer_norm_weight", f"{p}.mlp.linear_fc1.layer_norm_weight"
    return f"{p}.input_layernorm.weight", f"{p}.pre_mlp_layernorm.weight"


def _take(state: Mapping[str, Any], key: str, side: str):
    try:
        return state[key]
    except KeyError:
        raise ConvertError(f"{side} state dict: missing {key!r}") from None


def _fuse_qkv(q, k, v, s: QwenShape):
    per = s.num_heads // s.num_kv_heads
    rest = q.shape[1:]
    import torch

    qg = q.reshape(s.num_kv_heads, per * s.head_dim, *rest)
    kg = k.reshape(s.num_kv_heads, s.head_dim, *rest)
    vg = v.reshape(s.num_kv_heads, s.head_dim, *rest)
    return torch.cat((qg, kg, vg), dim=1).reshape(-1, *rest).contiguous()


def _split_qkv(qkv, s: QwenShape):
    per = s.num_heads // s.num_kv_heads
    rest = qkv.shape[1:]
    want = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    if qkv.shape[0] != want:
        raise ConvertError(f"linear_qkv: {qkv.shape[0]} rows, expected (heads {s.num_heads} + 2 x kv heads "
                           f"{s.num_kv_heads}) x head_dim {s.head_dim} = {want}")
    g = qkv.reshape(s.num_kv_heads, (per + 2) * s.head_dim, *rest)
    q, k, v = g.split([per * s.head_dim, s.head_dim, s.head_dim], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(), v.reshape(-1, *rest).contiguous())


def hf_to_megatron(state: Mapping[str, Any], config: Any, spec: str = "local") -> dict[str, Any]:
    """HF Qwen2 names -> GPTModel names (no `_extra_state`: load with strict=False on TE)."""
    import torch

    spec, s = _spec(spec), QwenShape.of(config)
    out = {"embedding.word_embeddings.weight": _take(state, "model.embed_tokens.weight", "HF")}
    for n in range(s.num_layers):
        h, m = f"model.layers.{n}", f"decoder.layers.{n}"
        ln1, ln2 = _norm_keys(spec, n)
        out[ln1] = _take(state, f"{h}.input_layernorm.weight", "HF")
        att = {x: _take(state, f"{h}.self_attn.{x}_proj.weight", "HF") for x in "qkv"}
        out[f"{m}.self_attention.linear_qkv.weight"] = _fuse_qkv(att["q"], att["k"], att["v"], s)
        if f"{h}.self_attn.q_proj.bias" in state:
            b = {x: _take(state, f"{h}.self_attn.{x}_proj.bias", "HF") for x in "qkv"}
            out[f"{m}.self_attention.linear_qkv.bias"] = _fuse_qkv(b["q"], b["k"], b["v"], s)
        out[f"{m}.self_attention.linear_proj.weight"] = _take(state, f"{h}.self_attn.o_proj.weight", "HF")
        out[ln2] = _take(state, f"{h}.post_attention_layernorm.weight", "HF")
        out[f"{m}.mlp.linear_fc1.weight"] = torch.cat((_take(state, f"{h}.mlp.gate_proj.weight", "HF"),
                                                      _take(state, f"{h}.mlp.up_proj.weight", "HF")), 0)
        out[f"{m}.mlp.linear_fc2.weight"] = _take(state, f"{h}.mlp.down_proj.weight", "HF")
    out["decoder.final_layernorm.weight"] = _take(state, "model.norm.weight", "HF")
    if not s.tied:
        out["output_layer.weight"] = _take(state, "lm_head.weight", "HF")
    return out


def megatron_to_hf(state: Mapping[str, Any], config: Any, spec: str = "local") -> dict[str, Any]:
    """GPTModel names -> HF Qwen2 names. `_extra_state` entries (TE's fp8 metadata) are dropped;
    with tied embeddings HF gets no `lm_head.weight` (HF ties it to the embedding on load)."""
    spec, s = _spec(spec), QwenShape.of(config)
    state = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    out = {"model.embed_tokens.weight": _take(state, "embedding.word_embeddings.weight", "megatron")}
    for n in range(s.num_layers):
        h, m = f"model.layers.{n}", f"decoder.layers.{n}"
        ln1, ln2 = _norm_keys(spec, n)
        out[f"{h}.input_layernorm.weight"] = _take(state, ln1, "megatron")
        q, k, v = _split_qkv(_take(state, f"{m}.self_attention.linear_qkv.weight", "megatron"), s)
        out.update({f"{h}.self_attn.q_proj.weight": q, f"{h}.self_attn.k_proj.weight": k,
                    f"{h}.self_attn.v_proj.weight": v})
        if f"{m}.self_attention.linear_qkv.bias" in state:
            q, k, v = _split_qkv(state[f"{m}.self_attention.linear_qkv.bias"], s)
            out.update({f"{h}.self_attn.q_proj.bias": q, f"{h}.self_attn.k_proj.bias": k,
                        f"{h}.self_attn.v_proj.bias": v})
        out[f"{h}.self_attn.o_proj.weight"] = _take(state, f"{m}.self_attention.linear_proj.weight", "megatron")
        out[f"{h}.post_attention_layernorm.weight"] = _take(state, ln2, "megatron")
        fc1 = _take(state, f"{m}.mlp.linear_fc1.weight", "megatron")
        if fc1.shape[0] % 2:
            raise ConvertError(f"{m}.mlp.linear_fc1.weight: {fc1.shape[0]} rows, expected [gate; up] (even)")
        gate, up = fc1.chunk(2, dim=0)
        out[f"{h}.mlp.gate_proj.weight"], out[f"{h}.mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()
        out[f"{h}.mlp.down_proj.weight"] = _take(state, f"{m}.mlp.linear_fc2.weight", "megatron")
    out["model.norm.weight"] = _take(state, "decoder.final_layernorm.weight", "megatron")
    if not s.tied:
        out["lm_head.weight"] = _take(state, "output_layer.weight", "megatron")
    extra = sorted(set(state) - set(_megatron_keys(s, spec)))
    if extra:
        raise ConvertError(f"megatron state dict: unexpected key(s) {', '.join(extra[:5])} for spec {spec!r} "
                           f"(tied={s.tied}): not a Qwen2 GPTModel")
    return out


def _megatron_keys(s: QwenShape, spec: str) -> list[str]:
    """Every name a Qwen2 GPTModel of this shape may hold (qkv bias optional)."""
    keys = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    for n in range(s.num_layers):
        m = f"decoder.layers.{n}"
        keys += [*_norm_keys(spec, n), f"{m}.self_attention.linear_qkv.weight", f"{m}.self_attention.linear_qkv.bias",
                 f"{m}.self_attention.linear_proj.weight", f"{m}.mlp.linear_fc1.weight", f"{m}.mlp.linear_fc2.weight"]
    return keys + ([] if s.tied else ["output_layer.weight"])
