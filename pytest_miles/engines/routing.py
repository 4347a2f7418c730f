"""Routing records from a real SGLang server: the experts its MoE layers chose for every token of
a prefill. SGLang returns them when started with `--enable-return-routed-experts` and asked with
`"return_routed_experts": true` (what Miles' rollout routing replay reads): `meta_info.routed_experts`
is base64 of int32 expert ids, shaped [tokens, layers, top-k]."""

from __future__ import annotations

import base64

from pytest_miles.engines.base import EngineError
from pytest_miles.models.routing import RoutingRecord

SERVER_FLAG = "--enable-return-routed-experts"


def decode_routed_experts(payload: str | list, num_layers: int, topk: int, tokens: list[int],
                          source: str = "sglang") -> RoutingRecord:
    """SGLang's `routed_experts` (base64 int32, or a nested list) -> a record of the first
    len(tokens) rows; EngineError naming the sizes when it holds fewer or is not [*, layers, top-k]."""
    import numpy as np

    if isinstance(payload, str):
        flat = np.frombuffer(base64.b64decode(payload), dtype=np.int32)
    else:
        flat = np.asarray(payload, dtype=np.int64).reshape(-1)
    per_token = num_layers * topk
    if flat.size % per_token or flat.size // per_token < len(tokens):
        raise EngineError(f"{source}: routed_experts holds {flat.size} ids; expected at least {len(tokens)} tokens "
                          f"x {num_layers} layers x top-{topk} (a whole number of [layers, top-k] rows)")
    rows = flat.reshape(-1, num_layers, topk)[:len(tokens)]
    experts = tuple(tuple(tuple(sorted(int(e) for e in layer)) for layer in row) for row in rows)
    return RoutingRecord(source=source, experts=experts, tokens=tuple(int(t) for t in tokens))


def sglang_routing(engine, tokens: list[int], num_layers: int, topk: int) -> RoutingRecord:
    """One prefill of `tokens` (and one greedy token) on an SGLang server engine started with
    SERVER_FLAG; the routing of the prompt's tokens."""
    payload = {"input_ids": list(tokens), "return_routed_experts": True,
               "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
    out = engine._post("/generate", payload)
    meta = (out[0] if isinstance(out, list) else out).get("meta_info", {})
    if meta.get("routed_experts") is None:
        raise EngineError(f"{engine.name}: no meta_info.routed_experts in the answer; start the server with "
                          f"{SERVER_FLAG} (keys: {', '.join(sorted(meta))})")
    return decode_routed_experts(meta["routed_experts"], num_layers, topk, tokens, source=f"{engine.name} rollout")
