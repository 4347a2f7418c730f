"""One cell of the precision matrix measured end to end, as Miles reports it: SGLang samples at the
rollout precision, the Megatron trainer scores the same token ids at the train precision, on the
same weights, giving `train_rollout_logprob_abs_diff`, max |diff|, KL and the token count.
How a cell is judged and which weights it uses: docs/precision.md."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_miles.checks.drift import DriftReport
from pytest_miles.errors import CellNotRunnable  # noqa: F401  (importable here too)
from pytest_miles.facts.precision import FORMATS, cell_status, unsupported_on, validate_precision_config

ROLLOUT_ENGINE = "sglang"
# Train precision -> the trainer's layer spec; "fp32" (not a matrix cell) is the local-spec CPU path.
TRAIN_IMPL = {"bf16": "transformer_engine", "fp8_blockwise": "transformer_engine", "mxfp8": "transformer_engine",
              "nvfp4": "transformer_engine", "fp32": "local"}


PAD_MULTIPLE = 16


@dataclass
class CellReport:
    """The end-to-end figures of one cell; `reference` is drift.py's in-process figure for the
    same cell (reference quantizers, one torch process) on the same config, for comparison."""

    drift: DriftReport
    sequences: int
    tolerance: float | None = None
    reference: DriftReport | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    parity: Any = None  # checks.parity.ParityReport of the same tokens (per token, first vs rest, buckets)

    @property
    def verdict(self) -> str:
        if self.tolerance is None:
            return "figure only (no tolerance set)"
        ok = self.drift.train_rollout_logprob_abs_diff <= self.tolerance
        return f"{'within' if ok else 'ABOVE'} tolerance {self.tolerance:g}"

    def check(self) -> CellReport:
        """AssertionError when a tolerance is set and the figure is above it."""
        if self.tolerance is not None and self.drift.train_rollout_logprob_abs_diff > self.tolerance:
            raise AssertionError(f"precision cell above its tolerance: {self.render()}")
        return self

    def render(self) -> str:
        ref = f"; in-process reference {self.reference.train_rollout_logprob_abs_diff:.6g}" if self.reference else ""
        parity = f"\n{self.parity.render()}" if self.parity is not None else ""
        return f"{self.drift.render()} ({self.sequences} sequences); {self.verdict}{ref}{parity}"

    def figures(self) -> dict[str, Any]:
        d = self.drift
        first = self.parity.pairs.get("train_vs_decode") if self.parity is not None else None
        extra = {} if first is None else {"first_token_abs_diff": f"{first.first_token_mean_abs:.6g}",
                                          "bitwise_equal": f"{first.bitwise_equal}/{first.tokens}"}
        return {**extra, "train_rollout_logprob_abs_diff": f"{d.train_rollout_logprob_abs_diff:.6g}",
                "max_abs_diff": f"{d.max_abs_diff:.6g}", "kl": f"{d.kl:.6g}", "tokens": d.tokens,
                "verdict": self.verdict}


def drift_between(rollout: str, train: str, rollout_logprobs: list[list[float]], train_logprobs: list[list[float]],
                  what: str = "end-to-end") -> DriftReport:
    """The figures over the rollout's tokens. KL(rollout || train) is estimated from the sampled
    tokens alone (SGLang returns the sampled token's logprob, not the distribution): the k3
    estimator mean(exp(r) - 1 - r), r = logp_train - logp_rollout, unbiased and >= 0."""
    if len(rollout_logprobs) != len(train_logprobs):
        raise AssertionError(f"{len(rollout_logprobs)} rollout sequences but {len(train_logprobs)} "
                             "scored by the trainer")
    diffs, k3 = [], []
    for i, (lr, lt) in enumerate(zip(rollout_logprobs, train_logprobs)):
        if len(lr) != len(lt):
            raise AssertionError(f"sequence {i}: {len(lr)} rollout logprobs, {len(lt)} from the trainer "
                                 "(not the same token ids?)")
        for a, b in zip(lr, lt):
            r = b - a
            diffs.append(abs(r))
            k3.append(math.expm1(r) - r)
    if not diffs:
        raise AssertionError("no rollout tokens to compare: every sequence came back empty")
    return DriftReport(rollout, train, sum(diffs) / len(diffs), max(diffs), sum(k3) / len(k3), len(diffs), what)


def check_cell(rollout: str, train: str, hardware) -> None:
    """Before anything starts: the precision rules (ValueError naming the rule), then the GPU
    (CellNotRunnable naming the format and the GPU found)."""
    validate_precision_config(rollout, train)
    reason = unsupported_on(cell_status(rollout, train).formats, hardware)
    if reason:
        raise CellNotRunnable(f"rollout={rollout}-train={train}: {reason}")


def seeded_prompts(n: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n, prompt_len), generator=g).tolist()


def trainer_logprobs(trainer_factory, hf_dir: Path, cfg, samples: list[dict], train: str,
                     **trainer_kwargs: Any) -> tuple[list[list[float]], dict[str, Any]]:
    """The trainer's logprobs of each sample's response tokens, forward only, at `train`
    precision, weights loaded from `hf_dir` (bf16), through the trainer's API:
    `ModelArgs.qwen2(cfg)`, `MegatronTrainer.session(init_hf=...)` (HF->Megatron through
    `pytest_miles.models.convert.hf_to_megatron(state, config, spec="te")`) and `session.logprobs(samples)`."""
    from dataclasses import asdict

    from pytest_miles.trainers.megatron import ModelArgs


    # TE's FP8 GEMMs want the token count a multiple of 16: right-pad every sample to one such
    # width (causal attention: earlier positions never see the padding) and drop the pads' scores.
    seq = -(-max(len(s["tokens"]) for s in samples) // PAD_MULTIPLE) * PAD_MULTIPLE
    padded = [{**s, "tokens": list(s["tokens"]) + [0] * (seq - len(s["tokens"]))} for s in samples]
    trainer = trainer_factory(model=ModelArgs.qwen2(cfg, seq_length=seq), transformer_impl=TRAIN_IMPL[train],
                              precision=train, **trainer_kwargs)
    with trainer.session(init_hf=hf_dir, hf_config=asdict(cfg)) as session:
        scored = session.logprobs(padded)
    logprobs = [row[: len(s["tokens"]) - s["prompt_len"]] for s, row in zip(samples, scored)]
    return logprobs, {"trainer": f"megatron-core {TRAIN_IMPL[train]} {train}",
                      "attention_backend": getattr(trainer, "attention_backend", None)}


def user_model(model_dir: str | Path):
    """-> (dir, TinyConfig) of a user's HF Qwen2 checkpoint, or ValueError naming what does not fit
    (the converter and trainer map Qwen2: RMSNorm, SwiGLU, GQA, bias on q/k/v, RoPE)."""
    from pytest_miles.models.embedded import config_from_hf, read_hf_config

    path = Path(model_dir)
    try:
        raw = read_hf_config(path)
    except FileNotFoundError:
        raise ValueError(f"model_dir {path}: no config.json (an HF model directory is expected)") from None
    except ValueError as exc:
        raise ValueError(f"model_dir {path}: {exc}") from None
    arch = raw.get("architectures") or [raw.get("model_type")]
    if raw.get("model_type") != "qwen2" and "Qwen2ForCausalLM" not in arch:
        raise ValueError(f"model_dir {path}: {arch} is not a Qwen2 model (model_type qwen2, Qwen2ForCausalLM): the "
                         "HF<->Megatron converter maps Qwen2 only")
    if raw.get("quantization_config"):
        raise ValueError(f"model_dir {path}: a quantized checkpoint; give the bf16 one (the FP8 rollout checkpoint "
                         "is written from it)")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"model_dir {path}: no *.safetensors (pickled .bin checkpoints are not read)")
    try:
        return path, config_from_hf(raw, path / "config.json")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model_dir {path}: {exc}") from None


def measure_precision_cell(cell, engine_factory, trainer_factory, *, hardware, work_dir: str | Path,
                           config=None, model_dir: str | Path | None = None, sequences: int = 4, prompt_len: int = 16,
                           max_new_tokens: int = 32, seed: int = 0, tolerance: float | None = None,
                           record: Callable[..., Any] | None = None,
                           trainer_kwargs: dict[str, Any] | None = None) -> CellReport:
    """Measure one (rollout, train) cell end to end; `cell` is a precision.Cell or (rollout, train).

    SGLang (deterministic, the rollout precision's checkpoint) samples `sequences` continuations
    of seeded prompts with their logprobs at temperature 1; the trainer scores the same ids.
    Weights: the embedded model of `config` (TINY128 by default), or `model_dir`, your own HF
    Qwen2 checkpoint (bf16 or fp32 safetensors, e.g. `--miles-model`): the trainer loads it, the
    bf16 rollout serves it, an FP8 rollout serves it quantized into `work_dir/<rollout>`."""
    from pytest_miles.checks.drift import measure_logprob_drift
    from pytest_miles.engines.base import SamplingParams
    from pytest_miles.models.embedded import write_hf_checkpoint
    from pytest_miles.models.quantized_checkpoints import (
        TINY128,
        check_sglang_layout,
        quantize_checkpoint_dir,
    )

    if hasattr(cell, "rollout") and hasattr(cell, "train"):
        rollout, train = cell.rollout, cell.train
    elif isinstance(cell, (tuple, list)) and len(cell) == 2 and all(isinstance(x, str) for x in cell):
        rollout, train = cell
    else:
        raise ValueError(f"cell {cell!r}: expected a precision.Cell (precision_matrix()) or a (rollout, train) "
                         "pair of format names, e.g. ('fp8_blockwise', 'bf16')")
    check_cell(rollout, train, hardware)
    if sequences < 1 or prompt_len < 1 or max_new_tokens < 1:
        raise ValueError(f"sequences {sequences}, prompt_len {prompt_len}, max_new_tokens {max_new_tokens}: each >= 1")
    work = Path(work_dir)
    if model_dir is not None:
        if config is not None:
            raise ValueError("config= and model_dir=: give one (model_dir's config.json is the config)")
        bf16_dir, cfg = user_model(model_dir)
    else:
        cfg = config or TINY128
        bf16_dir = work / "bf16"
        if not (bf16_dir / "config.json").exists():
            write_hf_checkpoint(bf16_dir, cfg, dtype="bfloat16")
    serve_dir = bf16_dir
    if rollout != "bf16":
        serve_dir = work / rollout
        if not (serve_dir / "config.json").exists():  # quantized from the very bf16 files the trainer loads
            quantize_checkpoint_dir(bf16_dir, serve_dir, rollout)
        problems = check_sglang_layout(serve_dir)
        if problems:  # e.g. a linear dim that is not a multiple of the 128-row block: SGLang would refuse it
            raise ValueError(f"rollout checkpoint {serve_dir} for {rollout}: SGLang's FP8 loader would refuse it: "
                             + "; ".join(problems[:3]))
    prompts = seeded_prompts(sequences, prompt_len, cfg.vocab_size, seed)
    engine = engine_factory(ROLLOUT_ENGINE, model=str(serve_dir), deterministic=True)
    outs = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, sampling_seed=seed))
    samples = [{"tokens": p + o.output_ids, "prompt_len": len(p)} for p, o in zip(prompts, outs)]
    train_lp, facts = trainer_logprobs(trainer_factory, bf16_dir, cfg, samples, train, **(trainer_kwargs or {}))
    drift = drift_between(rollout, train, [o.logprobs for o in outs], train_lp, f"end-to-end: {engine.name}")
    from pytest_miles.checks.parity import ParityRecord, compare_parity

    backend = (engine.server_info() if hasattr(engine, "server_info") else {}).get("attention_backend")
    records = [ParityRecord(p, o.output_ids, o.logprobs, lp) for p, o, lp in zip(prompts, outs, train_lp)]
    parity = compare_parity(records, {"model": f"hidden{cfg.hidden_size}", "rollout": rollout, "train": train,
                                      "backend": backend, "tp": 1})
    reference = measure_logprob_drift(rollout, train, config=cfg, seed=seed)
    # How peaked the model is, for reading the figure: a near-uniform model hides precision drift, a
    # saturated one (the sampled token's logprob ~0, others far below) turns any rounding into a flip.
    rollout_lp = [x for o in outs for x in o.logprobs]
    report = CellReport(drift, sequences, tolerance, reference,
                        {**facts, "rollout_checkpoint": str(serve_dir), "engine": engine.name,
                         "rollout_mean_logprob": round(sum(rollout_lp) / max(len(rollout_lp), 1), 4)}, parity)
    if record is not None:
        record(f"precision cell rollout={rollout} x train={train} (end to end)", **report.figures())
    return report


def heatmap_label(rollout: str, train: str, got: CellReport | str | None, hardware=None) -> str:
    """One heatmap cell's text: the figure and token count, "skipped" and the start of why, "-"
    for a cell the precision rules refuse, or "not run" (a valid cell nobody ran, on a GPU that could)."""
    import textwrap

    status = cell_status(rollout, train)
    if got is None and hardware is not None and status.valid:
        got = unsupported_on(status.formats, hardware)  # skipped before it started: say why
    if isinstance(got, CellReport):
        return f"{got.drift.train_rollout_logprob_abs_diff:.3g}\n{got.drift.tokens} tok"
    if isinstance(got, str):
        return "\n".join(["skipped", *textwrap.wrap(got, 22)[:2]])
    return "-" if not status.valid else "not run"


def plot_precision_matrix(
    reports: dict[tuple[str, str], CellReport | str],
    path: str | Path,
    title: str = "train_rollout_logprob_abs_diff",
    hardware=None,
) -> Path | None:
    """Heatmap of the matrix: measured cells with their figure, the others with why not
    (a skip reason, or the precision rule). `hardware` (a Hardware): a valid cell with no entry
    that this GPU cannot run (skipped before it started) shows that reason too, not "not run".
    None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(FORMATS)
    values = [[float("nan")] * len(names) for _ in names]
    fig, ax = plt.subplots(figsize=(7.5, 6))
    for i, r in enumerate(names):
        for j, t in enumerate(names):
            got = reports.get((r, t))
            if isinstance(got, CellReport):
                values[i][j] = got.drift.train_rollout_logprob_abs_diff
            ax.text(j, i, heatmap_label(r, t, got, hardware), ha="center", va="center", fontsize=7)
    im = ax.imshow(values, cmap="viridis")
    fig.colorbar(im, ax=ax, label="mean |logp_train - logp_rollout|")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("train precision")
    ax.set_ylabel("rollout precision")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
