"""Two loops, bit by bit, in the order the loop ran: the first divergence named by iteration,
stage (rollout / reward / train / weight_sync) and item, with the reproducibility guide's troubleshooting row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pytest_miles.checks.loop_record import LoopRecord, LoopRun
from pytest_miles.facts import troubleshooting

STAGES = ("rollout", "reward", "train", "weight_sync")

# The troubleshooting rows (facts/troubleshooting.toml) by the stage where the first difference shows.
TROUBLESHOOTING = {stage: "\n    or: ".join(row.arrow() for row in troubleshooting.for_stage(stage))
                   for stage in STAGES}
ELSEWHERE = "; ".join(row.arrow() for row in troubleshooting.for_stage("elsewhere"))
MAX_CHARS = 4000


@dataclass(frozen=True)
class Divergence:
    iteration: int
    stage: str
    item: str
    detail: str

    def render(self, a: str = "A", b: str = "B") -> str:
        return (f"loops {a} and {b} diverge first at iteration {self.iteration}, stage {self.stage}: {self.item}\n"
                f"  {self.detail}\n  likely cause: {TROUBLESHOOTING[self.stage]}\n"
                f"  if it happens only across nodes or machines: {ELSEWHERE}")


def _records(x: LoopRun | list[LoopRecord], which: str = "argument") -> list[LoopRecord]:
    if isinstance(x, LoopRun):
        return x.records
    records = list(x) if isinstance(x, (list, tuple)) else None
    if records is None or not all(isinstance(r, LoopRecord) for r in records):
        given = type(x).__name__ if records is None else \
            f"a list holding {next(type(r).__name__ for r in records if not isinstance(r, LoopRecord))}"
        raise TypeError(f"{which}: {given} given; expected a LoopRun (what rl_loop_factory returns) "
                        "or a list of its LoopRecords")
    return records


def _rollout(ra: LoopRecord, rb: LoopRecord) -> tuple[str, str] | None:
    if ra.prompts != rb.prompts:
        p = next(i for i, (x, y) in enumerate(zip(ra.prompts, rb.prompts)) if x != y) \
            if len(ra.prompts) == len(rb.prompts) else 0
        return f"prompt {p}", f"prompt token ids {ra.prompts[p][:16]} vs {rb.prompts[p][:16]} (the data order differs)"
    for p, (ga, gb) in enumerate(zip(ra.tokens, rb.tokens)):
        for s, (ta, tb) in enumerate(zip(ga, gb)):
            la, lb = ra.logprob_bits[p][s], rb.logprob_bits[p][s]
            for t in range(max(len(ta), len(tb))):
                ida, idb = (ta[t] if t < len(ta) else None), (tb[t] if t < len(tb) else None)
                xa, xb = (la[t] if t < len(la) else None), (lb[t] if t < len(lb) else None)
                if ida != idb or xa != xb:
                    what = "token id" if ida != idb else "logprob bits"
                    return (f"prompt {p}, sample {s}, token {t}",
                            f"{what} differ: id {ida} vs {idb}, logprob {_hexf(xa)} vs {_hexf(xb)} "
                            f"(sampling_seed {ra.sampling_seeds[p][s]} vs {rb.sampling_seeds[p][s]})")
    return None


def _hexf(x: str | None) -> str:
    return "absent" if x is None else f"{float.fromhex(x)!r} ({x})"


def _reward(ra: LoopRecord, rb: LoopRecord) -> tuple[str, str] | None:
    for p, (ga, gb) in enumerate(zip(ra.rewards, rb.rewards)):
        for s, (x, y) in enumerate(zip(ga, gb)):
            if x != y or ra.advantages[p][s] != rb.advantages[p][s]:
                return f"prompt {p}, sample {s}", f"reward {x!r} vs {y!r}, advantage {ra.advantages[p][s]!r} vs " \
                                                  f"{rb.advantages[p][s]!r}"
    return None


def _manifest_diff(ma: dict[str, str], mb: dict[str, str], pa: str, pb: str) -> tuple[str, str] | None:
    if ma == mb:
        return None
    key = next(k for k in dict.fromkeys([*ma, *mb]) if ma.get(k) != mb.get(k))
    detail = f"{key}: digest {str(ma.get(key))[:16]} vs {str(mb.get(key))[:16]}"
    if Path(pa).exists() and Path(pb).exists():  # the values are still there: name the index
        from pytest_miles.checks.checkpoints import compare_checkpoints

        first = compare_checkpoints(pa, pb, first=True).first
        if first is not None:
            key, detail = first.name, first.detail
    return f"tensor {key}", detail


def _train(ra: LoopRecord, rb: LoopRecord) -> tuple[str, str] | None:
    for p, (ga, gb) in enumerate(zip(ra.train_logprob_bits, rb.train_logprob_bits)):
        for s, (la, lb) in enumerate(zip(ga, gb)):
            if la != lb:
                t = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
                return (f"trainer logprob, prompt {p}, sample {s}, token {t}",
                        f"{_hexf(la[t] if t < len(la) else None)} vs {_hexf(lb[t] if t < len(lb) else None)}")
    if ra.loss_bits != rb.loss_bits:
        return f"loss at step {ra.iteration}", f"{_hexf(ra.loss_bits)} vs {_hexf(rb.loss_bits)}"
    if ra.grad_norm_bits != rb.grad_norm_bits:
        return f"grad norm at step {ra.iteration}", f"{_hexf(ra.grad_norm_bits)} vs {_hexf(rb.grad_norm_bits)}"
    found = _manifest_diff(ra.checkpoint_manifest, rb.checkpoint_manifest, ra.checkpoint, rb.checkpoint)
    return (f"checkpoint {Path(ra.checkpoint).name}, {found[0]}", found[1]) if found else None


def _weight_sync(ra: LoopRecord, rb: LoopRecord) -> tuple[str, str] | None:
    found = _manifest_diff(ra.weights_manifest, rb.weights_manifest, ra.weights, rb.weights)
    return (f"weights pushed to the engine, {found[0]}", found[1]) if found else None


CHECKS = {"rollout": _rollout, "reward": _reward, "train": _train, "weight_sync": _weight_sync}


def first_divergence(a: LoopRun | list[LoopRecord], b: LoopRun | list[LoopRecord]) -> Divergence | None:
    """The first (iteration, stage, item) where the loops differ, or None when bitwise equal."""
    ra_all, rb_all = _records(a, "a"), _records(b, "b")
    for ra, rb in zip(ra_all, rb_all):
        if ra.iteration != rb.iteration:
            raise ValueError(f"records out of step: iteration {ra.iteration} vs {rb.iteration}")
        for stage in STAGES:
            found = CHECKS[stage](ra, rb)
            if found:
                return Divergence(ra.iteration, stage, *found)
    if len(ra_all) != len(rb_all):
        raise ValueError(f"the loops ran {len(ra_all)} and {len(rb_all)} iterations: compare like with like")
    return None


def assert_loops_bitwise_equal(a: LoopRun | list[LoopRecord], b: LoopRun | list[LoopRecord]) -> None:
    """AssertionError naming the first divergence (iteration, stage, item, likely cause), capped
    in length; returns None when every recorded bit is equal."""
    d = first_divergence(a, b)
    if d is None:
        return
    na, nb = (x.name if isinstance(x, LoopRun) else n for x, n in ((a, "A"), (b, "B")))
    text = d.render(na, nb)
    later = sum(1 for ra, rb in zip(_records(a), _records(b)) if ra.iteration > d.iteration and
                any(CHECKS[s](ra, rb) for s in STAGES))
    text += f"\n  {later} later iteration(s) differ too (a divergence propagates; fix the first one)"
    raise AssertionError(text if len(text) <= MAX_CHARS else text[:MAX_CHARS - 20] + "\n  ... (truncated)")
