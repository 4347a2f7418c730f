"""Determinism under production traffic, the judging half (scenarios/traffic.py drives the engine):
every request's token ids, chosen logprobs and top-k logprob maps compared bit for bit against
the same request served alone on a flushed engine, and against a second run with another
arrival order; non-finite values are a failure. Witnesses read from the engine prove that the
stress happened (retractions, chunked prefills, a batch of more than one); without them a pass
is not applicable, never PASSED. Each difference names its variance: batch composition (no
cache hit, the same request alone differs), cache state (the request hit the prefix cache) or
arrival order (the two traffic runs differ)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pytest_miles.checks.witness import context_lines
from pytest_miles.engines.base import Output
from pytest_miles.errors import KnownLimitation, NotApplicable

WITNESSES = ("retractions", "max_running_batch", "chunked_prefills", "cached_tokens")
VARIANCES = ("batch composition", "cache state", "arrival order")


def _bits(x: float | None) -> str | None:
    return None if x is None else float(x).hex()


def first_difference(ref: Output, got: Output) -> str | None:
    """The first way `got` differs from `ref` bitwise (ids, chosen logprobs, top-k maps), or a
    non-finite value in either; None when they are the same bits."""
    for name, out in (("reference", ref), ("served", got)):
        for pos, lp in enumerate(out.logprobs):
            if not math.isfinite(lp):
                return f"{name} chosen logprob at token {pos} is {lp!r} (non-finite)"
        for pos, row in enumerate(out.top_logprobs):
            bad = [t for t, v in row.items() if not math.isfinite(v)]
            if bad:
                return f"{name} top-k logprob of token id {bad[0]} at position {pos} is {row[bad[0]]!r} (non-finite)"
    for pos in range(max(len(ref.output_ids), len(got.output_ids))):
        a = ref.output_ids[pos] if pos < len(ref.output_ids) else None
        b = got.output_ids[pos] if pos < len(got.output_ids) else None
        la = ref.logprobs[pos] if pos < len(ref.logprobs) else None
        lb = got.logprobs[pos] if pos < len(got.logprobs) else None
        if a != b or _bits(la) != _bits(lb):
            return f"token {pos}: id {a} vs {b}, logprob {la!r} vs {lb!r}"
    if len(ref.top_logprobs) != len(got.top_logprobs):
        return f"top-k logprob maps for {len(ref.top_logprobs)} vs {len(got.top_logprobs)} positions"
    for pos, (ra, rb) in enumerate(zip(ref.top_logprobs, got.top_logprobs)):
        if set(ra) != set(rb):
            return f"top-k at token {pos}: token ids {sorted(ra)} vs {sorted(rb)}"
        for t in sorted(ra):
            if _bits(ra[t]) != _bits(rb[t]):
                return f"top-k at token {pos}: token id {t} logprob {ra[t]!r} vs {rb[t]!r}"
    return None


def difference_position(ref: Output, got: Output) -> int | None:
    """The first output position where `got` and `ref` differ (id, chosen logprob or top-k map); None
    where there is no difference or a value is non-finite (no position explains that)."""
    for out in (ref, got):
        if any(not math.isfinite(v) for v in out.logprobs) or any(
                not math.isfinite(v) for row in out.top_logprobs for v in row.values()):
            return None
    n = max(len(ref.output_ids), len(got.output_ids), len(ref.top_logprobs), len(got.top_logprobs))

    def at(xs: list, i: int) -> Any:
        return xs[i] if i < len(xs) else None

    for pos in range(n):
        ra, rb = at(ref.top_logprobs, pos), at(got.top_logprobs, pos)
        if (at(ref.output_ids, pos) != at(got.output_ids, pos)
                or _bits(at(ref.logprobs, pos)) != _bits(at(got.logprobs, pos))
                or (ra is None) != (rb is None)
                or (ra is not None and {t: _bits(v) for t, v in ra.items()} != {t: _bits(v) for t, v in rb.items()})):
            return pos
    return None


@dataclass
class TrafficMismatch:
    request: int
    against: str  # "alone on a flushed engine" | "a second run with another arrival order"
    variance: str
    detail: str
    sampling: str
    token: int | None = None  # the first output position that differs (None: a non-finite value)

    def render(self) -> str:
        return f"request {self.request} ({self.sampling}) vs {self.against} [{self.variance}]: {self.detail}"


@dataclass
class TrafficReport:
    engine: str
    requests: int
    mismatches: list[TrafficMismatch] = field(default_factory=list)
    witnesses: dict[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    shape: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    chunked: list[int] = field(default_factory=list)  # requests whose prompt is longer than the prefill chunk
    retracted: dict[int, int] = field(default_factory=dict)  # request -> retractions over both traffic runs, if told

    @property
    def passed(self) -> bool:
        return not self.mismatches

    @property
    def variances(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.mismatches:
            out[m.variance] = out.get(m.variance, 0) + 1
        return out

    def missing_witnesses(self) -> list[str]:
        return [w for w in self.required if not self.witnesses.get(w)]

    def render(self, limit: int = 10) -> str:
        head = (f"determinism under load on {self.engine}: {'PASS' if self.passed else 'FAIL'}; {self.requests} "
                f"requests, {len(self.mismatches)} differences, {self.seconds:.1f} s")
        lines = [head]
        if self.mismatches:
            lines.append("  variance caught: " + ", ".join(f"{k} ({v})" for k, v in self.variances.items()))
        lines += ["  - " + m.render() for m in self.mismatches[:limit]]
        if len(self.mismatches) > limit:
            lines.append(f"  ... and {len(self.mismatches) - limit} more")
        lines.append("  witnesses (read from the engine): " + ", ".join(f"{k}={v}" for k, v in self.witnesses.items()))
        lines += context_lines(self.shape, self.settings, self.notes)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "passed": self.passed, "requests": self.requests,
                "mismatches": [vars(m) for m in self.mismatches], "variances": self.variances,
                "witnesses": self.witnesses, "settings": self.settings, "shape": self.shape,
                "notes": self.notes, "seconds": self.seconds, "chunked": self.chunked,
                "retracted": {str(k): v for k, v in self.retracted.items()}}


def compare_traffic(report: TrafficReport, sampling: list[str], first: list[Output], second: list[Output],
                    alone: list[Output]) -> TrafficReport:
    """Fill `report.mismatches`: each request of the first run vs alone and vs the second run."""
    for i, (a, b, solo) in enumerate(zip(first, second, alone)):
        times = (a.retractions or 0) + (b.retractions or 0)
        if times:
            report.retracted[i] = times
        for got, against in ((a, "itself alone on a flushed engine"),
                             (b, "itself alone on a flushed engine (in the reordered run)")):
            diff = first_difference(solo, got)
            if diff is not None:
                variance = "cache state" if (got.cached_tokens or 0) > 0 else "batch composition"
                if variance == "cache state":
                    diff += f" (the request hit the prefix cache: cached_tokens {got.cached_tokens})"
                if got.retractions:
                    diff += f" (retracted {got.retractions}x in that run)"
                report.mismatches.append(TrafficMismatch(i, against, variance, diff, sampling[i],
                                                         difference_position(solo, got)))
                break
        diff = first_difference(a, b)
        if diff is not None:
            report.mismatches.append(TrafficMismatch(i, "a second run with another arrival order", "arrival order",
                                                     diff, sampling[i], difference_position(a, b)))
    return report


# What can explain a differing request under traffic, in the order asked, and the capability check
# (mode) whose known limitation it is: a prompt longer than the chunk (chunked_prefill), a request the
# engine retracted and recomputed by a prefill over what it had decoded, differing from its 2nd token on
# (retraction), a difference in the prefill's own token (prefill_under_traffic).
EXPLANATIONS = ("chunked_prefill", "retraction", "prefill_under_traffic")


def explain(report: TrafficReport, cells: dict[str, Any]) -> tuple[dict[str, list[int]], list[int]]:
    """Each differing request's explanation: {mode: requests} for those a known limitation of `cells`
    (mode -> Capability) covers, and the requests none covers. A non-finite value is never explained."""
    known = {m for m, c in cells.items() if c is not None and c.known}
    chunked, first = set(report.chunked), {}  # request -> its first differing position (-1: non-finite)
    for m in report.mismatches:
        t, prev = (-1 if m.token is None else m.token), first.get(m.request)
        first[m.request] = t if prev is None else (-1 if -1 in (t, prev) else min(t, prev))
    covered: dict[str, list[int]] = {}
    unexplained = []
    for r, t in sorted(first.items()):
        why = None
        if t >= 0 and r in chunked and "chunked_prefill" in known:
            why = "chunked_prefill"
        elif t >= 1 and r in report.retracted and "retraction" in known:
            why = "retraction"
        elif t == 0 and r not in chunked and "prefill_under_traffic" in known:
            why = "prefill_under_traffic"
        if why is None:
            unexplained.append(r)
        else:
            covered.setdefault(why, []).append(r)
    return covered, unexplained


def judge_traffic(report: TrafficReport, chunked_prefill: Any = None, retraction: Any = None,
                  prefill_under_traffic: Any = None) -> TrafficReport:
    """A difference is a failure; a pass without the stress witnessed is not applicable. Where every
    differing request is covered by a known limitation of the capability data (Capability objects for
    the EXPLANATIONS: a chunked prompt, a retracted request differing from its 2nd token on, a
    difference in an unchunked prefill's own token), KnownLimitation (XFAIL naming the cells); any other
    difference fails whatever the data says. The notes say where they part either way."""
    if not report.passed:  # every difference in the message: the determinism report keeps it whole
        cells = {"chunked_prefill": chunked_prefill, "retraction": retraction,
                 "prefill_under_traffic": prefill_under_traffic}
        differ = {m.request for m in report.mismatches}
        if report.chunked:  # where they part: requests whose prefill was cut into chunks, and the others
            others = differ - set(report.chunked)
            report.notes.append(f"chunked prefill: {len(differ & set(report.chunked))} of {len(report.chunked)} "
                                f"chunked requests differ; {len(others)} of {report.requests - len(report.chunked)} "
                                "unchunked requests differ")
        if report.retracted:
            hit = sorted(differ & set(report.retracted))
            report.notes.append(f"retraction: {len(hit)} of {len(report.retracted)} retracted requests differ"
                                + (f" ({', '.join(map(str, hit[:20]))})" if hit else ""))
        covered, unexplained = explain(report, cells)
        for mode, reqs in covered.items():
            report.notes.append(f"{len(reqs)} differing requests covered by a known limitation ({mode}: "
                                f"{', '.join(map(str, reqs[:20]))}{' ...' if len(reqs) > 20 else ''}): "
                                f"{cells[mode].describe()}")
        if unexplained:
            report.notes.append(f"{len(unexplained)} differing requests no known limitation covers: "
                                + ", ".join(map(str, unexplained[:20])) + (" ..." if len(unexplained) > 20 else ""))
        elif covered:
            raise KnownLimitation(report, cells[max(covered, key=lambda m: len(covered[m]))])
        raise AssertionError(report.render(limit=len(report.mismatches)))
    missing = report.missing_witnesses()
    if missing:
        raise NotApplicable(f"determinism under load not applicable: the engine shows no {', '.join(missing)} "
                            f"(a pass would not show determinism under that stress)\n{report.render()}")
    return report


def judge_control(report: TrafficReport, deterministic: Any) -> TrafficReport:
    """A negative control must be caught for what it is about (batch composition or arrival order);
    cache-state differences alone leave it vacuous. The report names the variance it caught."""
    if report.passed:
        on = " (its deterministic mode is ON: a control needs it off)" if deterministic else ""
        raise AssertionError(f"negative control: determinism under load passed on {report.engine}{on}, so a pass "
                             f"of this check does not show determinism here\n{report.render()}")
    about = [v for v in report.variances if v in ("batch composition", "arrival order")]
    if not about:  # only cache-state differences: not what the control is about
        raise AssertionError(f"negative control: determinism under load vacuous on {report.engine}: every difference "
                             "is cache state (a request that hit the prefix cache vs itself alone on a flushed "
                             f"engine), none batch composition or arrival order\n{report.render()}")
    report.notes.append("negative control caught; variance: " + ", ".join(
        f"{v} ({n})" for v, n in report.variances.items() if v in about)
        + "".join(f"; {v} ({n}) not counted" for v, n in report.variances.items() if v not in about))
    return report


@dataclass
class FeatureReport:
    """Whether a served engine answered a request with one sampling feature (e.g. min_p with a seed);
    the capability data decides whether a failure is a known limitation."""

    engine: str
    mode: str
    passed: bool
    detail: str
    settings: dict[str, Any] = field(default_factory=dict)

    def render(self, limit: int = 10) -> str:
        lines = [f"{self.mode} on {self.engine}: {'PASS' if self.passed else 'FAIL'}; {self.detail}"]
        if self.settings:
            lines.append("  engine settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "mode": self.mode, "passed": self.passed, "detail": self.detail,
                "settings": self.settings}
