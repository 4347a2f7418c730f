"""megatron-core's MoE layer on a host (CPU) and its routing decisions recorded.

megatron-core 0.16.1's `Router.gating` moves the router weight to the CUDA device
(`megatron/core/transformer/moe/router.py`, `gating`), and its `router_gating_linear` reads
`te_general_gemm`, which is undefined without TransformerEngine (`moe_utils.py`,
`RouterGatingLinearFunction.forward`). `HostTopKRouter` is a `TopKRouter` supplied through the layer
spec's public extension point (`MoESubmodules.router`): on a CUDA weight with TransformerEngine it
gates as megatron-core does; elsewhere it computes the same fp32 linear with torch. Both record the router's logits and
the routing map of each forward while `recording` is on.
"""

from __future__ import annotations


def host_router_class():
    import torch
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter

    class HostTopKRouter(TopKRouter):
        recording = False

        def gating(self, input):
            if self.weight.device.type == "cuda" and moe_utils.HAVE_TE:
                logits = super().gating(input)
            else:
                logits = torch.nn.functional.linear(input.to(torch.float32), self.weight.to(torch.float32),
                                                    None if self.bias is None else self.bias.to(torch.float32))
            if self.recording:
                self.records.append({"logits": logits.detach().reshape(-1, logits.shape[-1]).float().cpu()})
            return logits

        def routing(self, logits, padding_mask=None):
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
            if self.recording:
                self.records[-1]["map"] = routing_map.detach().cpu()
            return probs, routing_map

    return HostTopKRouter


def moe_config_fields(m: dict) -> dict:
    """TransformerConfig fields of the mixture-of-experts layer (Qwen3-MoE semantics: softmax over
    every expert, top-k, renormalised = softmax over the top-k logits; no aux loss, no dropping;
    the allgather dispatcher, the one that needs neither expert parallelism nor CUDA)."""
    if not m.get("num_moe_experts"):
        return {}
    return {"num_moe_experts": m["num_moe_experts"], "moe_router_topk": m.get("moe_router_topk", 2),
            "moe_ffn_hidden_size": m.get("moe_ffn_hidden_size") or m.get("ffn_hidden_size"),
            "moe_token_dispatcher_type": "allgather", "moe_router_load_balancing_type": "none",
            "moe_aux_loss_coeff": 0.0, "moe_router_pre_softmax": False, "moe_router_score_function": "softmax",
            "moe_router_dtype": "fp32", "qk_layernorm": bool(m.get("qk_layernorm"))}


def routers(model) -> list:
    """The model's routers, in layer order."""
    return [layer.mlp.router for layer in model.decoder.layers if hasattr(layer.mlp, "router")]


def record_routing(model, forward, source: str, tokens: list[list[int]]) -> list[dict]:
    """Run `forward()` with every router recording; one RoutingRecord (as JSON) per sequence of
    `tokens` (the batch is [b, s]; megatron-core routes tokens in [s, b] order)."""
    import torch

    from pytest_miles.models.routing import record_from_layers

    rs = routers(model)
    for r in rs:
        r.recording, r.records = True, []
    try:
        forward()
    finally:
        for r in rs:
            r.recording = False
    b, width = len(tokens), max(len(t) for t in tokens)
    out = []
    for i, seq in enumerate(tokens):
        rows = [r.records[-1]["map"].view(width, b, -1)[:len(seq), i] for r in rs]
        probs = [torch.softmax(r.records[-1]["logits"].view(width, b, -1)[:len(seq), i], -1) for r in rs]
        out.append(record_from_layers(source, rows, probs, tokens=seq).to_json())
    return out
