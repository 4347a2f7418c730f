"""megatron-core's MoE layer on a host (CPU) and its routing decisions recorded.

megatron-core 0.16.1's `Router.gating` moves the router weight to the CUDA device
(`megatron/core/transformer/moe/router.py`, `gating`), and its `router_gating_linear` reads
`te_general_gemm`, which is undefined without TransformerEngine (`moe_utils.py`,
`RouterGatingLinearFunction.forward`). `HostTopKRouter` is a `TopKRouter` supplied through the layer
spec's public extension point (`MoESubmodules.router`): on a CUDA weight with TransformerEngine it
gates as megatron-core does; elsewhere it computes the same fp32 linear with torch. Both record the router's logits and
the routing map of each forward while `recording` is on. `replaying` forces given experts per token in
every router (megatron-core's `RouterReplay`, enabled by `moe_enable_routing_replay`): the trainer side of
rollout routing replay (Miles' `--use-rollout-routing-replay`).
"""

from __future__ import annotations

from contextlib import contextmanager


def host_router_class():
    import torch
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

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
            replay = getattr(self, "replay_target", None)
            if replay is not None:  # megatron-core's RouterReplay, the experts in this router's own slot order
                flat = logits.reshape(-1, logits.shape[-1])
                if replay.shape[0] != flat.shape[0]:
                    raise ValueError(f"routing replay: {replay.shape[0]} token rows for a router that sees "
                                     f"{flat.shape[0]} tokens (sequence or context parallelism is not replayed)")
                idx = replay.to(flat.device)
                own = idx[:, 0] < 0  # rows the record does not cover: the router's own top-k
                idx = torch.where(own[:, None], torch.topk(flat, idx.shape[1], dim=1).indices, idx)
                idx = idx.gather(1, flat.gather(1, idx).argsort(dim=1, descending=True, stable=True))
                self.router_replay.clear_indices()
                self.router_replay.set_target_indices(idx)
                self.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
            try:
                probs, routing_map = super().routing(logits, padding_mask=padding_mask)
            finally:
                if replay is not None:
                    self.router_replay.clear_router_replay_action()
                    self.router_replay.clear_indices()
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
            "moe_router_dtype": "fp32", "qk_layernorm": bool(m.get("qk_layernorm")),
            # megatron-core's own routing replay (router_replay.py): idle unless a forward replays a record
            "moe_enable_routing_replay": True}


def routers(model) -> list:
    """The model's routers, in layer order (through Float16Module, the TransformerEngine path's bf16 wrapper)."""
    inner = getattr(model, "module", model)
    return [layer.mlp.router for layer in inner.decoder.layers if hasattr(layer.mlp, "router")]


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
    b, e = len(tokens), rs[0].records[-1]["map"].shape[-1]  # the forward's width may be padded past the longest
    out = []
    for i, seq in enumerate(tokens):
        rows = [r.records[-1]["map"].view(-1, b, e)[:len(seq), i] for r in rs]
        probs = [torch.softmax(r.records[-1]["logits"].view(-1, b, e)[:len(seq), i], -1) for r in rs]
        out.append(record_from_layers(source, rows, probs, tokens=seq).to_json())
    return out


def replay_targets(experts: list[list], width: int, topk: int) -> list:
    """Per router, the [width * batch, k] expert ids of megatron-core's [s, b] token order, from
    experts[sample][token][layer] (models.routing.replay_experts). Rows the record does not cover (right
    padding; a sample's last token when the rollout never forwarded it) hold -1: the router routes those
    by itself, as it would without replay (their outputs reach no scored logprob, and leaving them be
    keeps every expert's batch what it was)."""
    import torch

    b, layers = len(experts), len(experts[0][0])
    out = []
    for n in range(layers):
        t = torch.full((width, b, topk), -1, dtype=torch.long)
        for i, seq in enumerate(experts):
            if seq:
                t[:len(seq), i] = torch.tensor([row[n] for row in seq], dtype=torch.long)
        out.append(t.reshape(width * b, topk))
    return out


@contextmanager
def replaying(model, targets: list | None):
    """Every router of `model` replays its target (replay_targets) in the forwards run inside; a
    model with another count of routers than targets is a ValueError naming both."""
    rs = routers(model)
    if targets is not None and len(targets) != len(rs):
        raise ValueError(f"routing replay: {len(targets)} layers of targets for {len(rs)} MoE layers on this rank")
    for r, t in zip(rs, targets or [None] * len(rs)):
        r.replay_target = t
    try:
        yield
    finally:
        for r in rs:
            r.replay_target = None
