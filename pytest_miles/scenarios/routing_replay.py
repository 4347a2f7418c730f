"""Rollout routing replay (R3, Miles' --use-rollout-routing-replay) as a measurement: the engine
samples and records the experts its MoE layers chose for every token; the trainer scores the same
ids twice on the same weights, once routing by itself and once replaying the rollout's experts in
every MoE layer. The report holds both train-rollout logprob gaps (checks/parity.py's report, per
token) and the routing comparison each way (checks/routing.py): how many (token, layer) decisions
differed without replay, and that none differ with it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pytest_miles.checks.parity import ParityRecord, ParityReport, compare_parity
from pytest_miles.checks.routing import RoutingReport, compare_routing
from pytest_miles.engines.base import SamplingParams
from pytest_miles.errors import InputError
from pytest_miles.scenarios.parity import versions

__all__ = ["RoutingReplayReport", "measure_routing_replay", "nudge_router"]


@dataclass
class RoutingReplayReport:
    without: ParityReport  # the trainer routing by itself
    replayed: ParityReport  # the trainer replaying the rollout's experts
    routing_without: list[RoutingReport]  # per sequence: rollout vs the trainer's own routing
    routing_replayed: list[RoutingReport]  # per sequence: rollout vs the routing the replayed forward used
    train: dict[str, list[list[float]]] = field(default_factory=dict, repr=False)  # "without"/"replayed" logprobs

    @property
    def bitwise_same(self) -> int:
        """Response tokens whose trainer logprob has the same bits with and without replay."""
        return sum(a.hex() == b.hex() for x, y in zip(self.train["without"], self.train["replayed"])
                   for a, b in zip(x, y))

    @staticmethod
    def _differ(reports: list[RoutingReport]) -> int:
        return sum(len(r.differences) for r in reports)

    @property
    def decisions(self) -> int:
        return sum(r.tokens * r.layers for r in self.routing_without)

    @property
    def differ_without(self) -> int:
        return self._differ(self.routing_without)

    @property
    def differ_replayed(self) -> int:
        return self._differ(self.routing_replayed)

    def agreement(self, replayed: bool) -> float:
        return 1.0 - (self.differ_replayed if replayed else self.differ_without) / max(self.decisions, 1)

    def gap(self, replayed: bool) -> tuple[float, float]:
        """(mean |train - decode|, max |train - decode|) over every response token."""
        f = (self.replayed if replayed else self.without).pairs["train_vs_decode"]
        return f.mean_abs, f.max_abs

    def render(self) -> str:
        lines = [f"rollout routing replay: {self.decisions} routing decisions (tokens x MoE layers)"]
        for replayed, name in ((False, "without replay"), (True, "with replay")):
            mean, top = self.gap(replayed)
            lines.append(f"  {name}: routing agreement {self.agreement(replayed):.2%} "
                         f"({self.differ_replayed if replayed else self.differ_without} differ); train-rollout "
                         f"logprob gap mean |d| {mean:.3g}, max |d| {top:.3g}")
        first = next((r for r in self.routing_without if r.first is not None), None)
        if first is not None:
            lines.append("  without replay, " + first.render().splitlines()[1].strip())
        return "\n".join(lines)

    def to_json(self, per_token: bool = True) -> dict[str, Any]:
        return {"decisions": self.decisions, "differ_without": self.differ_without,
                "differ_replayed": self.differ_replayed,
                "without": self.without.to_json(per_token), "replayed": self.replayed.to_json(per_token),
                "routing_without": [r.to_json() for r in self.routing_without],
                "routing_replayed": [r.to_json() for r in self.routing_replayed]}


def nudge_router(layer: int, expert: int, amount: float) -> Callable:
    """A planted rollout-side router perturbation (a negative control, for the embedded reference
    engine's MoeDecoder.router_hooks): `amount` added to one expert's logit in one layer, every token."""
    def hook(n, positions, logits):
        if n != layer:
            return None
        out = logits.clone()
        out[..., expert] += amount
        return out

    hook.__name__ = f"nudge_router(layer={layer}, expert={expert}, amount={amount})"
    return hook


def measure_routing_replay(engine, session, prompts: list[list[int]], *, params: SamplingParams | None = None,
                           config: dict[str, Any] | None = None, routing: Callable | None = None,
                           router_hooks: tuple = ()) -> RoutingReplayReport:
    """Sample `prompts` on `engine`, record its routing of every sample's tokens (`routing(tokens)`
    -> RoutingRecord; the engine's own `routing` by default, e.g. a bound engines.routing.sglang_routing
    for SGLang), score the samples with the trainer `session` without and with the replay of that
    routing. `router_hooks`: applied to the embedded reference engine's routers while it samples and
    records (nudge_router, a negative control). No verdict: the caller asserts on the report."""
    if not prompts or any(not p for p in prompts):
        raise InputError("measure_routing_replay(prompts): expected a non-empty list of non-empty token-id lists")
    if router_hooks and not hasattr(getattr(engine, "model", None), "router_hooks"):
        raise InputError(f"measure_routing_replay(router_hooks=): {type(engine).__name__} takes no router hooks; "
                         "accepted on the embedded reference engine serving a mixture-of-experts shape")
    routing = routing or (lambda tokens: engine.routing(tokens, router_hooks=tuple(router_hooks)))
    params = params or SamplingParams(temperature=1.0, max_new_tokens=16, sampling_seed=0, ignore_eos=True)
    if router_hooks:
        engine.model.router_hooks = list(router_hooks)
    try:
        outs = engine.generate(prompts, params)
    finally:
        if router_hooks:
            engine.model.router_hooks = []
    samples = [{"tokens": list(p) + list(o.output_ids), "prompt_len": len(p)} for p, o in zip(prompts, outs)]
    rollout = [routing(s["tokens"]) for s in samples]
    reports, train = [], {}
    for replay in (None, rollout):
        got = session.score(samples, replay=replay)
        train["without" if replay is None else "replayed"] = got["logprobs"]
        records = [ParityRecord(list(p), list(o.output_ids), list(o.logprobs), list(lp), None, t, pos)
                   for p, o, lp, t, pos in zip(prompts, outs, got["logprobs"], got["targets"], got["positions"])]
        cfg = {"engine": getattr(engine, "name", "?"), "routing_replay": replay is not None, **(config or {})}
        reports.append(compare_parity(records, cfg, versions()))
    own = session.routing(samples)
    forced = session.routing(samples, replay=rollout)
    return RoutingReplayReport(reports[0], reports[1], [compare_routing(a, _cut(b, a)) for a, b in zip(rollout, own)],
                               [compare_routing(a, _cut(b, a)) for a, b in zip(rollout, forced)], train)


def _cut(trainer, rollout):
    """The trainer's record over the rollout's tokens (a rollout engine never forwards the last sampled token)."""
    n = rollout.num_tokens
    if trainer.num_tokens == n:
        return trainer
    return replace(trainer, experts=trainer.experts[:n], scores=None if trainer.scores is None else trainer.scores[:n],
                   tokens=None if trainer.tokens is None else trainer.tokens[:n])
