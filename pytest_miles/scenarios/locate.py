"""The divergence locator, launched: the engine's and the trainer's per layer point records of the
same tokens (b), or two trainer sessions' per step forward and backward records (a); then
checks.locate names the first place they differ. docs/parity.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_miles.checks.locate import LayerProfile, StepDivergence, locate_in_steps, profile_layers
from pytest_miles.errors import InputError, NotApplicable


def locate_engine_vs_trainer(engine, session, tokens: list[int], work_dir: str | Path, *, tolerance: float = 0.0,
                             plot: bool = True) -> LayerProfile:
    """Per decoder layer and sublayer, engine vs trainer hidden states of one prefill of `tokens`;
    the profile's answer names the first point past `tolerance` and the growth after it."""
    if not tokens:
        raise InputError("locate_engine_vs_trainer(tokens): expected a non-empty list of token ids")
    if not hasattr(engine, "hidden_states"):
        raise NotApplicable(f"{getattr(engine, 'name', engine)}: this engine exposes no per-layer hidden states "
                            "(the embedded engines do through hooks; an SGLang engine started with "
                            "engine_factory(\"sglang\", dump_hidden_states=True) does through SGLang's tensor dump)")
    work = Path(work_dir)
    mine = engine.hidden_states(list(tokens))
    theirs = session.hidden_states(list(tokens), work / "trainer-points.safetensors")
    prof = profile_layers(mine, theirs, sides=(getattr(engine, "name", "engine"), "trainer"), tolerance=tolerance)
    if plot:
        from pytest_miles.report.parity_plot import plot_layers

        plot_layers([{**r, "tolerance": tolerance} for r in prof.rows], work / "layers.png",
                    f"divergence by layer point: {prof.sides[0]} vs {prof.sides[1]}")
    return prof


def trace_steps(session, steps: list[list[dict]], work_dir: str | Path) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Train one step per item of `steps` (samples as for train_step) with hooks on; per step the
    {"forward": ..., "backward": ...} records and the backward order, for `locate_in_steps`."""
    from safetensors.torch import load_file

    work = Path(work_dir)
    records, orders = [], []
    for i, samples in enumerate(steps):
        out = session.train_step(samples, trace=work / f"step-{i + 1:04d}.safetensors")
        got = load_file(out["trace"]["path"])
        records.append({phase: {k.split("/", 1)[1]: v for k, v in got.items() if k.startswith(phase + "/")}
                        for phase in ("forward", "backward")})
        orders.append(out["trace"]["backward_order"])
    return records, orders


def locate_trainer_runs(session_a, session_b, steps: list[list[dict]] | tuple[list[list[dict]], list[list[dict]]],
                        work_dir: str | Path, *, tolerance: float = 0.0,
                        reset: str | Path | None = None) -> StepDivergence:
    """Two trainer sessions fed the same steps (or a pair of step lists, one per run): the first
    step, phase and layer point where they differ ("step 3, backward, layer 5 mlp"). `reset`: HF
    weights each session is reset to before its run (then one session can play both runs)."""
    steps_a, steps_b = steps if isinstance(steps, tuple) else (steps, steps)
    work = Path(work_dir)
    if reset is not None:
        session_a.reset(reset)
    a, order = trace_steps(session_a, steps_a, work / "a")
    if reset is not None:
        session_b.reset(reset)
    b, _ = trace_steps(session_b, steps_b, work / "b")
    return locate_in_steps(a, b, tolerance=tolerance, order=order)
