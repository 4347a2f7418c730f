"""Measure train-rollout parity: the engine samples (decode logprobs), recomputes the same ids
in one prefill, and the trainer scores the same ids on the same weights, telling which ids and
positions it gathered; checks/parity.py compares. docs/parity.md."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_miles.checks.parity import ParityRecord, ParityReport, compare_parity
from pytest_miles.engines.base import SamplingParams
from pytest_miles.errors import InputError

VERSIONED = ("torch", "megatron-core", "sglang", "transformer_engine", "flashinfer-python", "pytest-miles")


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _scored(trainer_or_session, samples: list[dict], init_hf, hf_config) -> dict:
    """The trainer's answer from a live session (`score`), or from a session opened on `init_hf`."""
    if hasattr(trainer_or_session, "score"):
        return trainer_or_session.score(samples)
    if hasattr(trainer_or_session, "session"):
        if init_hf is None:
            raise InputError("measure_parity(trainer): a trainer (not a live session) needs init_hf=, the HF weights "
                             "the engine serves, so that both sides score the same weights")
        with trainer_or_session.session(init_hf=init_hf, hf_config=hf_config) as session:
            return session.score(samples)
    raise InputError(f"measure_parity: {type(trainer_or_session).__name__} is neither a trainer session (score) nor a "
                     "trainer (session)")


def pad_samples(samples: list[dict], multiple: int | None) -> list[dict]:
    """Every sample right-padded (id 0) to one width, a multiple of `multiple` (TE's FP8 GEMMs want
    the token count so); causal attention: no scored position sees the padding. None: unchanged."""
    if multiple is None:
        return samples
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise InputError(f"measure_parity(pad_multiple={multiple!r}): expected an integer >= 1 or None")
    width = -(-max(len(s["tokens"]) for s in samples) // multiple) * multiple
    return [{**s, "tokens": list(s["tokens"]) + [0] * (width - len(s["tokens"]))} for s in samples]


def trim_scored(got: dict, samples: list[dict]) -> dict:
    """The trainer's answer on padded samples cut back to each (unpadded) sample's response tokens:
    logprobs, and the targets and positions where the trainer gave them."""
    out = dict(got)
    for key in ("logprobs", "targets", "positions"):
        if got.get(key) is not None:
            out[key] = [list(row)[: len(s["tokens"]) - s["prompt_len"]] for row, s in zip(got[key], samples)]
    return out


def measure_parity(engine, trainer_or_session, prompts: list[list[int]], *,
                   params: SamplingParams | list[SamplingParams] | None = None, config: dict[str, Any] | None = None,
                   init_hf: str | Path | None = None, hf_config: dict | None = None, prefill: bool = True,
                   plot: str | Path | None = None,
                   transform: Callable[[list[dict]], list[dict]] | None = None,
                   locate: float | None = None, work_dir: str | Path | None = None,
                   pad_multiple: int | None = None) -> ParityReport:
    """Sample `prompts` on `engine` (temperature 1 by default), recompute the same ids by prefill
    (`prefill=True`), score them with the trainer; the ParityReport (no verdict: assert_parity).
    `config`: model, rollout, train, backend, tp (the budget key; the engine's attention backend by
    default). `transform`: applied to the samples before the trainer sees them (negative controls).
    `plot`: a PNG path for the histogram and delta by position. `locate` (a tolerance): also run
    the divergence locator on the sequence with the largest |delta| (engines with hidden_states and
    a live session), its answer in the report and so in any failure message of assert_parity.
    `pad_multiple`: the trainer scores the samples right-padded to a multiple of it (FP8 training),
    its answer cut back to the real tokens."""
    if not prompts or any(not p for p in prompts):
        raise InputError("measure_parity(prompts): expected a non-empty list of non-empty token-id lists")
    params = params or SamplingParams(temperature=1.0, max_new_tokens=16, sampling_seed=0, ignore_eos=True)
    outs = engine.generate(prompts, params)
    pre = [engine.score(p, o.output_ids) for p, o in zip(prompts, outs)] if prefill else [None] * len(outs)
    samples = [{"tokens": list(p) + list(o.output_ids), "prompt_len": len(p)} for p, o in zip(prompts, outs)]
    if transform is not None:
        samples = transform(samples)
    got = trim_scored(_scored(trainer_or_session, pad_samples(samples, pad_multiple), init_hf, hf_config), samples)
    records = [
        ParityRecord(list(p), list(o.output_ids), list(o.logprobs), list(lp), pf, t, pos)
        for p, o, pf, lp, t, pos in zip(
            prompts,
            outs,
            pre,
            got["logprobs"],
            got.get("targets", [None] * len(outs)),
            got.get("positions", [None] * len(outs)),
        )
    ]
    info = engine.server_info() if hasattr(engine, "server_info") else {}
    cfg = {
        "backend": info.get("attention_backend"),
        "tp": info.get("tp_size", 1),
        "engine": getattr(engine, "name", "?"),
        **(config or {}),
    }
    report = compare_parity(records, cfg, versions())
    if (
        locate is not None
        and report.pairs
        and hasattr(engine, "hidden_states")
        and hasattr(trainer_or_session, "score")
    ):
        from pytest_miles.scenarios.locate import locate_engine_vs_trainer

        deltas = report.pairs["train_vs_decode"].deltas
        worst = max(range(len(deltas)), key=lambda i: max(map(abs, deltas[i]), default=0.0))
        where = Path(work_dir) if work_dir is not None else Path(plot).parent if plot is not None else None
        if where is None:
            raise InputError("measure_parity(locate=): give work_dir= (or plot=) for the locator's records")
        prof = locate_engine_vs_trainer(
            engine, trainer_or_session, samples[worst]["tokens"], where / "locator", tolerance=locate
        )
        report.locator = f"sequence {worst}: {prof.answer()}"
    if plot is not None and report.pairs:
        from pytest_miles.report.parity_plot import plot_parity

        made = plot_parity(report.pairs, plot, f"train-rollout parity ({cfg.get('engine')} vs trainer)")
        report.plot = str(made) if made else None
    return report
