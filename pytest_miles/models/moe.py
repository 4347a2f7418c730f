"""The embedded mixture-of-experts model: Qwen3-MoE's layout (q/k RMSNorm per head, no attention
bias, every layer sparse: a softmax router, the top-k experts, their weights renormalised when
`norm_topk_prob`), built from a config and a seed like the dense shapes, written as an HF checkpoint
that SGLang's Qwen3-MoE model class serves (`Qwen3MoeForCausalLM`).

The decoder reports what its routers chose (`routing_sink`) and lets an experiment nudge a router's
logits before the top-k (`router_hooks`): the routing records and the planted perturbation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pytest_miles.models.embedded import (
    TinyDecoder,
    tensor_chunks,
    write_streamed_safetensors,
    write_tokenizer,
)

ARCHITECTURE = "Qwen3MoeForCausalLM"
MODEL_TYPE = "qwen3_moe"


@dataclass(frozen=True)
class MoeConfig:
    """A Qwen3-MoE shape: every layer sparse (decoder_sparse_step 1, no mlp_only_layers)."""

    vocab_size: int = 512
    hidden_size: int = 128
    moe_intermediate_size: int = 64
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 64  # what GPU attention kernels (flashinfer, triton) support
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    seed: int = 1234
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        from pytest_miles.models.config_fields import check_fields

        check_fields(self)

    def hf_config(self, dtype: str = "bfloat16") -> dict:
        return {
            "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "torch_dtype": dtype,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.moe_intermediate_size * self.num_experts_per_tok,  # unused: no dense layer
            "moe_intermediate_size": self.moe_intermediate_size, "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok, "norm_topk_prob": self.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.0,
            "output_router_logits": False, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta, "rope_scaling": None, "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": self.num_hidden_layers, "initializer_range": 0.02, "bos_token_id": 1,
            "eos_token_id": 2, "use_cache": True,
        }


# MoE shapes (--miles-model-shape). tiny-moe: cheap on CPU (2 layers, hidden 128, 8 experts, top-2).
# qwen3-30b-a3b-2l: Qwen3-30B-A3B's per-layer shape (hidden 2048, 32/4 heads of 128, 128 experts of
# 768, top-8, its vocabulary) with 2 layers, for the GPU: ~3.7 GB bf16, written tensor by tensor.
MOE_SHAPES: dict[str, MoeConfig] = {
    "tiny-moe": MoeConfig(),
    "qwen3-30b-a3b-2l": MoeConfig(vocab_size=151936, hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                                  num_experts_per_tok=8, num_hidden_layers=2, num_attention_heads=32,
                                  num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
                                  rope_theta=1000000.0),
}


def is_moe_config(raw: dict) -> bool:
    """An HF config.json (as a dict) of the Qwen3-MoE architecture."""
    architectures = raw.get("architectures")
    return raw.get("model_type") == MODEL_TYPE or (isinstance(architectures, list) and ARCHITECTURE in architectures)


def moe_config_from_hf(raw: dict, where: str | Path = "config.json") -> MoeConfig:
    """A Qwen3-MoE config.json as a MoeConfig; InputError (a ValueError) naming `where` for what it cannot serve."""
    from pytest_miles.errors import InputError

    need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
            "num_experts_per_tok", "moe_intermediate_size")

    missing = [k for k in need if k not in raw]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}")
    if raw.get("mlp_only_layers") or raw.get("decoder_sparse_step", 1) != 1:
        raise InputError(f"{where}: dense layers among the sparse ones (mlp_only_layers, decoder_sparse_step) are "
                         "not served by the embedded model; expected every layer sparse")
    fields = {k: raw[k] for k in MoeConfig.__dataclass_fields__ if k in raw and raw[k] is not None}
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (hidden, heads)):
        fields.setdefault("head_dim", hidden // heads)  # else MoeConfig names the field that is wrong
    try:
        return MoeConfig(**fields)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def tensor_specs(cfg: MoeConfig) -> dict[str, tuple[int, ...]]:
    """HF (Qwen3-MoE) parameter names -> shapes, in file order."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.moe_intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    specs: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}"
        specs.update({f"{p}.input_layernorm.weight": (h,), f"{p}.self_attn.q_proj.weight": (q, h),
                      f"{p}.self_attn.k_proj.weight": (kv, h), f"{p}.self_attn.v_proj.weight": (kv, h),
                      f"{p}.self_attn.o_proj.weight": (h, q), f"{p}.self_attn.q_norm.weight": (d,),
                      f"{p}.self_attn.k_norm.weight": (d,), f"{p}.post_attention_layernorm.weight": (h,),
                      f"{p}.mlp.gate.weight": (cfg.num_experts, h)})
        for e in range(cfg.num_experts):
            specs.update(
                {
                    f"{p}.mlp.experts.{e}.gate_proj.weight": (f, h),
                    f"{p}.mlp.experts.{e}.up_proj.weight": (f, h),
                    f"{p}.mlp.experts.{e}.down_proj.weight": (h, f),
                }
            )
    specs["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        specs["lm_head.weight"] = (cfg.vocab_size, h)
    return specs


def init_moe_weights(cfg: MoeConfig) -> dict:
    """HF (Qwen3-MoE) names -> fp32 tensors from the seed alone (each tensor seeded by its name, as
    the dense shapes' streamed writer does: 1/sqrt(fan_in) linears, router included)."""
    import torch

    return {name: torch.cat(list(tensor_chunks(cfg, name, shape))) for name, shape in tensor_specs(cfg).items()}


def write_moe_checkpoint(
    path: str | Path, cfg: MoeConfig = MoeConfig(), dtype: str = "bfloat16", tokenizer: bool = False
) -> Path:
    """config.json + model.safetensors (written tensor by tensor) + generation config; the values
    are `init_moe_weights(cfg)`'s."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_streamed_safetensors(path / "model.safetensors", cfg, dtype, specs=tensor_specs(cfg))
    (path / "config.json").write_text(json.dumps(cfg.hf_config(dtype), indent=1))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (path / "pytest_miles_model.json").write_text(json.dumps(asdict(cfg)))
    if tokenizer:
        write_tokenizer(path, cfg.vocab_size)
    return path


class MoeDecoder(TinyDecoder):
    """The Qwen3-MoE forward over a state dict, with TinyDecoder's KV cache and attention.

    `router_hooks`: callables (layer, positions [B, S], logits [B, S, E] float32) -> logits or None,
    applied in order before the top-k (a planted perturbation). `routing_sink`: a callable
    (layer, positions, probs [B, S, E] float32, experts [B, S, k]) told every routing decision."""

    def __init__(self, cfg: MoeConfig, state: dict, device: str = "cpu", dtype=None, act_quant=None) -> None:
        super().__init__(cfg, state, device=device, dtype=dtype, act_quant=act_quant)
        self.router_hooks: list = []
        self.routing_sink = None

    def _qkv(self, p: str, hsn, b: int, s_new: int):
        w, cfg, d = self.w, self.cfg, self.cfg.head_dim
        q = self._lin(hsn, w[f"{p}.self_attn.q_proj.weight"]).view(b, s_new, cfg.num_attention_heads, d)
        k = self._lin(hsn, w[f"{p}.self_attn.k_proj.weight"]).view(b, s_new, cfg.num_key_value_heads, d)
        v = self._lin(hsn, w[f"{p}.self_attn.v_proj.weight"]).view(b, s_new, cfg.num_key_value_heads, d)
        return self._rms(q, w[f"{p}.self_attn.q_norm.weight"]), self._rms(k, w[f"{p}.self_attn.k_norm.weight"]), v

    def _mlp(self, n: int, hsn, positions):
        """Softmax router over all experts, top-k, renormalised when norm_topk_prob; each chosen
        expert runs on its tokens only, summed in ascending expert order."""
        import torch

        cfg, w, p = self.cfg, self.w, f"model.layers.{n}.mlp"
        logits = self._lin(hsn, w[f"{p}.gate.weight"]).float()
        for hook in self.router_hooks:
            got = hook(n, positions, logits)
            logits = logits if got is None else got
        probs = torch.softmax(logits, dim=-1)
        top, experts = torch.topk(probs, cfg.num_experts_per_tok, dim=-1)
        if cfg.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        if self.routing_sink is not None:
            self.routing_sink(n, positions, probs, experts)
        flat, h = hsn.reshape(-1, hsn.shape[-1]), hsn.shape[-1]
        flat_experts, flat_top = experts.reshape(flat.shape[0], -1), top.to(self.dtype).reshape(flat.shape[0], -1)
        out = torch.zeros_like(flat)
        if flat.shape[0] == 1:  # one token (the deterministic mode's every step): its k experts, no gather
            for slot, e in sorted(enumerate(flat_experts[0].tolist()), key=lambda x: x[1]):
                out += self._expert(p, e, flat) * flat_top[:, slot, None]
            return out.view(*hsn.shape[:-1], h)
        for e in torch.unique(flat_experts).tolist():
            rows, slot = (flat_experts == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, self._expert(p, e, flat[rows]) * flat_top[rows, slot, None])
        return out.view(*hsn.shape[:-1], h)

    def _expert(self, p: str, e: int, x):
        w = self.w
        gate = self._act(self._lin(x, w[f"{p}.experts.{e}.gate_proj.weight"]))
        return self._lin(
            gate * self._lin(x, w[f"{p}.experts.{e}.up_proj.weight"]), w[f"{p}.experts.{e}.down_proj.weight"]
        )
