"""A routing record: which experts each token went to in each MoE layer, as an engine or a
trainer's forward chose them, with the router's probabilities where the producer has them (what
tells a tie from a divergence). Produced by engines and trainers, compared by checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from pytest_miles.errors import InputError


@dataclass(frozen=True)
class RoutingRecord:
    """experts[token][layer]: the chosen expert ids, ascending (a set: the top-k slot order is not
    part of the routing); scores[token][layer]: the router's probability of every expert (None when
    the producer does not keep them); tokens: the token ids routed, when known."""

    source: str
    experts: tuple[tuple[tuple[int, ...], ...], ...]
    scores: tuple[tuple[tuple[float, ...], ...], ...] | None = None
    tokens: tuple[int, ...] | None = None
    facts: dict = field(default_factory=dict, compare=False)

    @property
    def num_tokens(self) -> int:
        return len(self.experts)

    @property
    def num_layers(self) -> int:
        return len(self.experts[0]) if self.experts else 0

    def to_json(self) -> dict:
        return {"source": self.source, "experts": [[list(e) for e in t] for t in self.experts],
                "scores": None if self.scores is None else [[list(s) for s in t] for t in self.scores],
                "tokens": None if self.tokens is None else list(self.tokens)}

    @classmethod
    def from_json(cls, raw: dict) -> RoutingRecord:
        scores = raw.get("scores")
        return cls(source=str(raw["source"]),
                   experts=tuple(tuple(tuple(int(x) for x in e) for e in t) for t in raw["experts"]),
                   scores=None if scores is None else tuple(tuple(tuple(float(x) for x in s) for s in t)
                                                            for t in scores),
                   tokens=None if raw.get("tokens") is None else tuple(int(x) for x in raw["tokens"]))


def record_from_layers(source: str, experts_by_layer: list, probs_by_layer: list | None = None,
                       tokens=None) -> RoutingRecord:
    """From per-layer tensors (experts [T, k] or a boolean routing map [T, E]; probs [T, E]) to a
    record indexed [token][layer]."""
    import torch

    rows = []
    for layer in experts_by_layer:
        layer = layer.detach().cpu()
        if layer.dtype == torch.bool:
            rows.append([tuple(int(e) for e in r.nonzero().flatten().tolist()) for r in layer])
        else:
            rows.append([tuple(sorted(int(e) for e in r.tolist())) for r in layer])
    experts = tuple(zip(*rows)) if rows else ()
    scores = None
    if probs_by_layer is not None:
        cols = [[tuple(float(x) for x in r.tolist()) for r in p.detach().cpu().float()] for p in probs_by_layer]
        scores = tuple(zip(*cols))
    return RoutingRecord(source=source, experts=tuple(tuple(t) for t in experts),
                         scores=None if scores is None else tuple(tuple(t) for t in scores),
                         tokens=None if tokens is None else tuple(int(t) for t in tokens))


def replay_experts(records, samples: list[dict], num_layers: int, num_experts: int, topk: int) -> list[list]:
    """The routing each sample's forward must replay, checked against the model: one RoutingRecord
    per sample, num_layers layers, top-k distinct expert ids in [0, num_experts) per token and layer,
    and either every token of the sample or all but its last (what a rollout engine forwarded: the
    last sampled token never went through the model; the trainer's routing of it reaches no scored
    logprob). As JSON: [sample][token][layer] -> expert ids. InputError naming what and what is accepted."""
    if not isinstance(records, (list, tuple)) or len(records) != len(samples):
        n = len(records) if isinstance(records, (list, tuple)) else type(records).__name__
        raise InputError(f"routing replay: {n} records for {len(samples)} samples; expected a list of one "
                         "RoutingRecord per sample, in the samples' order")
    out = []
    for i, (rec, s) in enumerate(zip(records, samples)):
        where = f"routing replay, sample {i}"
        if not isinstance(rec, RoutingRecord):
            raise InputError(f"{where}: {type(rec).__name__} is not accepted; expected a RoutingRecord "
                             "(an engine's routing, decode_routed_experts, a trainer's routing record)")
        n = len(s["tokens"])
        if rec.num_tokens not in (n, n - 1):
            raise InputError(f"{where}: the record holds {rec.num_tokens} tokens; the sample has {n}, and "
                             f"{n} or {n - 1} (all but the last) are accepted")
        if rec.tokens is not None and tuple(rec.tokens) != tuple(s["tokens"])[:len(rec.tokens)]:
            raise InputError(f"{where}: the record routed other token ids than the sample's; expected the "
                             "rollout's routing of these very tokens")
        for t, row in enumerate(rec.experts):
            if len(row) != num_layers:
                raise InputError(f"{where}, token {t}: {len(row)} layers; the model has {num_layers} MoE layers "
                                 "and exactly that many are accepted")
            for layer, experts in enumerate(row):
                bad = [e for e in experts if not 0 <= e < num_experts]
                if len(set(experts)) != topk or len(experts) != topk or bad:
                    raise InputError(f"{where}, token {t}, layer {layer}: experts {list(experts)}; accepted: "
                                     f"{topk} distinct expert ids in 0..{num_experts - 1} (top-{topk} of "
                                     f"{num_experts} experts)")
        out.append([[list(e) for e in row] for row in rec.experts])
    return out
