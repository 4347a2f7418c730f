"""Training-run reproducibility: losses and grad norms bit for bit at every step, checkpoints
tensor for tensor, and resume-from-checkpoint equivalent to an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_miles.checks.checkpoints import compare_checkpoints
from pytest_miles.recording import recorded


def _bits(x: float) -> str:
    return float(x).hex()


def runs_difference(a: Any, b: Any, *, label_a: str = "A", label_b: str = "B",
                    compare_checkpoints_too: bool = True) -> str | None:
    """None when equal, else a report naming the first step (and first tensor) that differs."""
    from pytest_miles.validation import check_run

    check_run(label_a, a)
    check_run(label_b, b)
    lines = []
    steps_a = range(a.first_step + 1, a.first_step + 1 + len(a.losses))
    steps_b = dict(zip(range(b.first_step + 1, b.first_step + 1 + len(b.losses)), zip(b.losses, b.grad_norms)))
    common = [s for s in steps_a if s in steps_b]
    if not common:
        return f"runs share no step ({label_a}: steps {list(steps_a)}, {label_b}: steps {list(steps_b)})"
    for step, loss, gn in zip(steps_a, a.losses, a.grad_norms):
        if step not in steps_b:
            continue
        lb, gb = steps_b[step]
        if _bits(loss) != _bits(lb) or _bits(gn) != _bits(gb):
            lines.append(f"first differing step: {step}: loss {loss!r} vs {lb!r} (|d| = {abs(loss - lb):.3g}), "
                         f"grad norm {gn!r} vs {gb!r}")
            break
    if compare_checkpoints_too:
        ck_a = {Path(c).name: c for c in a.checkpoints}
        ck_b = {Path(c).name: c for c in b.checkpoints}
        for name in sorted(set(ck_a) & set(ck_b)):
            report = compare_checkpoints(ck_a[name], ck_b[name])
            if not report.equal:
                lines.append(f"checkpoint {name}: first differing tensor {report.first.name}\n{report.render()}")
                break
        if not set(ck_a) & set(ck_b) and (ck_a or ck_b):
            lines.append(f"no checkpoint at a common step ({sorted(ck_a)} vs {sorted(ck_b)})")
    if not lines:
        return None
    return f"runs differ ({label_a} vs {label_b}, steps {common[0]}..{common[-1]} compared):\n" + "\n".join(lines)


@recorded("runs bitwise equal")
def assert_runs_bitwise_equal(run_a: Any, run_b: Any) -> None:
    """Losses and grad norms equal bit for bit at every common step; checkpoints at common steps equal."""
    diff = runs_difference(run_a, run_b)
    if diff is not None:
        raise AssertionError(diff)


@recorded("resume equivalent")
def assert_resume_equivalent(trainer_factory, steps: int, workdir: str | Path, **trainer_kwargs: Any) -> tuple:
    """N steps straight vs N/2 steps, save, resume in a fresh process, N/2 more: the final
    checkpoints must be bitwise equal, and so must the losses of the resumed steps."""
    if steps < 2:
        raise ValueError(f"steps: {steps} < 2 (resume needs a first half)")
    workdir = Path(workdir)
    half = steps // 2
    straight = trainer_factory(**trainer_kwargs).train(steps, save_dir=workdir / "straight", save_steps=[steps])
    first = trainer_factory(**trainer_kwargs).train(half, save_dir=workdir / "resumed", save_steps=[half])
    second = trainer_factory(**trainer_kwargs).train(steps, save_dir=workdir / "resumed", save_steps=[steps],
                                                     load_dir=workdir / "resumed")
    diff = runs_difference(straight, second, label_a=f"{steps} steps straight",
                           label_b=f"{half} + {steps - half} steps resumed")
    if diff is not None:
        raise AssertionError(diff)
    return straight, first, second
