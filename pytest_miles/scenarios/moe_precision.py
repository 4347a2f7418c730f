"""A precision cell on a mixture-of-experts shape, measured end to end with and without rollout
routing replay (the Miles low-precision guide: FP8 block-wise is validated on Qwen3-30B-A3B, and "on
MoE workloads, pair this with R3"). SGLang (deterministic, `--enable-return-routed-experts`) samples at
the rollout precision from its checkpoint (the block-wise FP8 twin of the bf16 weights: experts
included, models/quantized_moe.py) and records the experts it chose; megatron-core scores the same ids
at the train precision from the bf16 weights, once routing by itself and once replaying the rollout's
experts (scenarios/routing_replay.py). The report: the train-rollout logprob gap and the routing
agreement each way. Train precisions: "fp32" (the local spec: megatron-core's own SequentialMLP, no
TransformerEngine needed), "bf16" and "fp8_blockwise" (the TransformerEngine spec with TEGroupedMLP,
Miles' `--moe-grouped-gemm`; FP8 through TE's block-scaling recipe)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pytest_miles.engines.base import SamplingParams
from pytest_miles.errors import CellNotRunnable, InputError
from pytest_miles.facts.precision import unsupported_on
from pytest_miles.scenarios.precision_cells import TRAIN_IMPL, check_cell, seeded_prompts
from pytest_miles.scenarios.routing_replay import RoutingReplayReport, measure_routing_replay

ROLLOUTS = ("bf16", "fp8_blockwise")
TRAINS = ("fp32", "bf16", "fp8_blockwise")
BACKENDS = ("triton", "flashinfer")


@dataclass
class MoeCellReport:
    shape: str
    rollout: str
    train: str
    backend: str
    replay: RoutingReplayReport
    facts: dict[str, Any] = field(default_factory=dict)
    experts: str = ""  # the trainer's experts module

    @property
    def name(self) -> str:
        experts = f", {self.experts}" if self.experts else ""
        return f"{self.shape} rollout={self.rollout} x train={self.train} ({self.backend}{experts})"

    def figures(self) -> dict[str, Any]:
        """The cell's figures, as strings and counts (what the report records)."""
        r = self.replay
        (m0, x0), (m1, x1) = r.gap(False), r.gap(True)
        f0, f1 = r.without.pairs["train_vs_decode"], r.replayed.pairs["train_vs_decode"]
        return {"tokens": f0.tokens, "routing_decisions": r.decisions,
                "agreement_without_replay": f"{r.agreement(False):.4%}", "differ_without_replay": r.differ_without,
                "agreement_with_replay": f"{r.agreement(True):.4%}", "differ_with_replay": r.differ_replayed,
                "gap_mean_without_replay": f"{m0:.6g}", "gap_max_without_replay": f"{x0:.6g}",
                "k3_kl_without_replay": f"{f0.k3_kl:.6g}", "gap_mean_with_replay": f"{m1:.6g}",
                "gap_max_with_replay": f"{x1:.6g}", "k3_kl_with_replay": f"{f1.k3_kl:.6g}"}

    def render(self) -> str:
        return f"{self.name}\n{self.replay.render()}"

    def to_json(self) -> dict[str, Any]:
        return {"shape": self.shape, "rollout": self.rollout, "train": self.train, "backend": self.backend,
                "experts": self.experts,
                "figures": self.figures(), "facts": self.facts, "replay": self.replay.to_json(per_token=True)}


def _experts(impl: str, grouped: bool) -> str:
    if impl != "transformer_engine":
        return "SequentialMLP (local spec)"
    return "TEGroupedMLP" if grouped else "SequentialMLP (TE linears)"


def _check(rollout: str, train: str, backend: str, hardware) -> None:
    """Names first (InputError), then the precision rules and this GPU (ValueError / CellNotRunnable)."""
    for what, got, accepted in (("rollout", rollout, ROLLOUTS), ("train", train, TRAINS),
                                ("backend", backend, BACKENDS)):
        if got not in accepted:
            raise InputError(f"measure_moe_precision_cell({what}=): {got!r} is not accepted; expected one of "
                             f"{', '.join(accepted)}")
    if hardware is None:
        return
    if train == "fp32":  # the local spec: not a cell of the matrix; only the rollout's format needs the GPU
        reason = unsupported_on([rollout], hardware)
        if reason:
            raise CellNotRunnable(f"rollout={rollout}: {reason}")
        return
    check_cell(rollout, train, hardware)


def rollout_checkpoint(work_dir: str | Path, shape, rollout: str) -> tuple[Path, Path]:
    """-> (trainer's bf16 dir, the dir SGLang serves) for the shape, written once under work_dir/<shape>;
    the FP8 one checked against SGLang's loaders first (ValueError naming what it would reject)."""
    import torch

    from pytest_miles.models.moe import write_moe_checkpoint
    from pytest_miles.models.quantized_moe import check_moe_fp8_layout, fp8_moe_config, write_fp8_moe_checkpoints

    name = shape if isinstance(shape, str) else "custom"
    cfg = fp8_moe_config(shape)
    work = Path(work_dir) / name
    if rollout == "bf16":
        bf16 = work / "bf16"
        if not (bf16 / "config.json").exists():
            write_moe_checkpoint(bf16, cfg)
        return bf16, bf16
    # the realistic shape's 768 expert weights quantize in seconds on the GPU (minutes on the host's cores)
    bf16, fp8 = write_fp8_moe_checkpoints(work, cfg, "cuda" if torch.cuda.is_available() else None)
    problems = check_moe_fp8_layout(fp8, cfg)
    if problems:
        raise ValueError(f"rollout checkpoint {fp8}: SGLang's FP8 MoE loader would refuse it: "
                         + "; ".join(problems[:3]))
    return bf16, fp8


def measure_moe_precision_cell(engine_factory, trainer_factory, *, shape="tiny128-moe", rollout: str = "fp8_blockwise",
                               train: str = "fp8_blockwise", backend: str = "triton", work_dir: str | Path,
                               hardware=None, prompts: list[list[int]] | None = None,
                               params: SamplingParams | None = None, engine_args: tuple[str, ...] = (),
                               record: Callable[..., Any] | None = None, seed: int = 1,
                               grouped_experts: bool = True) -> MoeCellReport:
    """Measure one MoE cell end to end (module doc). `shape`: a name of quantized_moe.FP8_MOE_SHAPES or
    a MoeConfig that block FP8 can serve; `prompts`: token ids (4 seeded prompts of 12 by default);
    `engine_args`: extra SGLang server arguments; `grouped_experts`: on the TransformerEngine spec,
    TEGroupedMLP (True) or a SequentialMLP of TE linears. No verdict: the caller asserts on the report."""
    from pytest_miles.engines.routing import SERVER_FLAG, sglang_routing
    from pytest_miles.models.quantized_moe import fp8_moe_config
    from pytest_miles.trainers.megatron import ModelArgs

    _check(rollout, train, backend, hardware)
    try:
        cfg = fp8_moe_config(shape)
    except ValueError as exc:
        raise InputError(f"measure_moe_precision_cell(shape=): {exc}") from None
    bf16_dir, serve_dir = rollout_checkpoint(work_dir, shape, rollout)
    prompts = prompts or seeded_prompts(4, 12, cfg.vocab_size, seed)
    params = params or SamplingParams(temperature=1.0, max_new_tokens=16, sampling_seed=7, ignore_eos=True)
    engine = engine_factory("sglang", model=str(serve_dir), attention_backend=backend, deterministic=True,
                            extra_args=(SERVER_FLAG, *engine_args))
    model = replace(ModelArgs.qwen3_moe(cfg, seq_length=64), moe_grouped_gemm=grouped_experts)  # HF's RoPE
    trainer = trainer_factory(seed=seed, model=model, transformer_impl=TRAIN_IMPL[train], precision=train)
    config = {"model": shape if isinstance(shape, str) else "custom", "rollout": rollout, "train": train,
              "backend": backend, "tp": 1}
    with trainer.session(init_hf=bf16_dir, hf_config=asdict(cfg)) as session:
        report = measure_routing_replay(
            engine, session, prompts, params=params, config=config,
            routing=lambda t: sglang_routing(engine, t, cfg.num_hidden_layers, cfg.num_experts_per_tok))
    facts = {"rollout_checkpoint": str(serve_dir), "trainer": f"megatron-core {TRAIN_IMPL[train]} {train}",
             "experts": _experts(TRAIN_IMPL[train], grouped_experts),
             "engine_start_s": round(getattr(engine, "startup_seconds", 0.0) or 0.0, 1),
             "engine_log": str(getattr(engine, "log_path", "") or "")}
    out = MoeCellReport(config["model"], rollout, train, backend, report, facts, facts["experts"])
    if record is not None:
        record(f"MoE precision cell {out.name}, with and without routing replay", **out.figures())
    return out
