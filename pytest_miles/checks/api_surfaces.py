"""Every API surface, the judging half (scenarios/cache_api.py drives the engine): the same request
(token-id prompt, sampling parameters, seed) through /generate (`sampling_seed`), /v1/completions
and /v1/chat/completions (`seed`) and the offline sglang.Engine, each on a flushed engine, must give
the same bits: token ids, chosen logprobs and top-k maps, /generate being the reference.

A surface that cannot serve the request here is not applicable with the reason (no tokenizer for
the OpenAI surfaces, no offline engine given, a chat template that changes the prompt ids); fewer
than two surfaces is not applicable. The seed must matter, or a surface that ignores it would pass:
at least one sampled request must change when only its seed changes (the seed witness, read on
/generate). A difference goes through the capability data (the api_surfaces cell cites the upstream
report of `seed` ignored on /v1/completions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pytest_miles.checks.traffic import first_difference
from pytest_miles.engines.base import Output
from pytest_miles.errors import NotApplicable

REFERENCE = "/generate"


@dataclass
class SurfaceRequest:
    index: int
    sampling: str
    prompt: list[int]
    outputs: dict[str, Output] = field(default_factory=dict)  # surface -> its answer
    prompt_ids: dict[str, list[int]] = field(default_factory=dict)  # surface -> the prompt ids it reports using
    seed_changes: bool | None = None  # another seed gives other tokens on /generate (None: greedy, not asked)


@dataclass
class SurfaceReport:
    engine: str
    requests: list[SurfaceRequest] = field(default_factory=list)
    not_applicable: dict[str, str] = field(default_factory=dict)  # surface -> why it did not run
    settings: dict[str, Any] = field(default_factory=dict)
    shape: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    mode: str = "api_surfaces"

    @property
    def surfaces(self) -> list[str]:
        seen: list[str] = []
        for r in self.requests:
            seen += [s for s in r.outputs if s not in seen]
        return seen

    def mismatches(self) -> list[tuple[SurfaceRequest, str, str]]:
        out = []
        for r in self.requests:
            ref = r.outputs.get(REFERENCE)
            for surface, got in r.outputs.items():
                if surface == REFERENCE or ref is None:
                    continue
                diff = first_difference(ref, got)
                if diff is not None:
                    out.append((r, surface, diff))
        return out

    @property
    def passed(self) -> bool:
        return not self.mismatches()

    @property
    def seed_witnessed(self) -> bool:
        return any(r.seed_changes for r in self.requests)

    def render(self, limit: int = 10) -> str:
        bad = self.mismatches()
        lines = [f"API surfaces on {self.engine}: {'PASS' if self.passed else 'FAIL'}; {len(self.requests)} "
                 f"requests on {', '.join(self.surfaces) or 'no surface'}, {len(bad)} differences vs {REFERENCE}, "
                 f"{self.seconds:.1f} s"]
        lines += [f"  - request {r.index} ({r.sampling}) {surface} vs {REFERENCE}: {d}"
                  for r, surface, d in bad[:limit]]
        if len(bad) > limit:
            lines.append(f"  ... and {len(bad) - limit} more")
        by_surface: dict[str, int] = {}
        for _, surface, _ in bad:
            by_surface[surface] = by_surface.get(surface, 0) + 1
        if by_surface:
            lines.append("  surfaces that differ: " + ", ".join(f"{s} ({n})" for s, n in by_surface.items()))
        lines += [f"  not applicable: {s}: {why}" for s, why in self.not_applicable.items()]
        sampled = [r for r in self.requests if r.seed_changes is not None]
        lines.append(f"  seed witness (/generate, another seed): {sum(bool(r.seed_changes) for r in sampled)} of "
                     f"{len(sampled)} sampled requests change")
        if self.shape:
            lines.append("  shape: " + ", ".join(f"{k} {v}" for k, v in self.shape.items()))
        if self.settings:
            lines.append("  engine settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "passed": self.passed, "surfaces": self.surfaces,
                "not_applicable": self.not_applicable, "seed_witnessed": self.seed_witnessed,
                "mismatches": [{"request": r.index, "surface": s, "detail": d} for r, s, d in self.mismatches()],
                "settings": self.settings, "shape": self.shape, "notes": self.notes, "seconds": self.seconds}


def drop_changed_prompts(report: SurfaceReport) -> None:
    """A surface whose reported prompt ids differ from the request's did not serve the same request
    (a chat template that adds tokens): its answers leave the comparison, the surface not applicable."""
    for r in report.requests:
        for surface, ids in list(r.prompt_ids.items()):
            if ids != r.prompt and surface in r.outputs:
                report.not_applicable[surface] = (
                    f"its prompt ids differ from the request's (request {r.index}: {ids[:12]}... vs "
                    f"{r.prompt[:12]}...): the chat template changes the prompt, so it is not the same request")
    for r in report.requests:
        for surface in report.not_applicable:
            r.outputs.pop(surface, None)


def judge_api_surfaces(report: SurfaceReport, capability: Any) -> SurfaceReport:
    """Not applicable with fewer than two surfaces, or without a sampled request whose seed matters;
    then the differences through the capability data."""
    from pytest_miles.capabilities.verdict import judge

    drop_changed_prompts(report)
    if len(report.surfaces) < 2:
        why = "; ".join(f"{s}: {w}" for s, w in report.not_applicable.items())
        raise NotApplicable(f"API surfaces not applicable: fewer than two surfaces served the requests ({why})\n"
                            f"{report.render()}")
    if not report.passed:
        return judge(report, capability)
    if not report.seed_witnessed:
        raise NotApplicable("API surfaces not applicable: no sampled request changed with its seed, so a surface "
                            f"that ignores the seed would pass too\n{report.render()}")
    return judge(report, capability)
