"""The configurations train-rollout parity is measured in on a GPU (docs/parity.md): one
`ParityCell` per model shape x rollout precision x train precision, with what each needs: the
weights SGLang serves (bf16, or block-wise FP8 quantized from the very bf16 files the trainer
loads), the trainer's options (megatron-core's local spec in fp32, or TransformerEngine in bf16 or
FP8 block-wise), the budget key, and an order that starts each engine configuration once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_miles.errors import InputError

ROLLOUTS = ("bf16", "fp8_blockwise")  # what SGLang serves: the bf16 checkpoint or the block-wise FP8 one
# Train precision -> the trainer's layer spec: fp32 is megatron-core's local spec (what the RL loop trains with),
# the others TransformerEngine (Miles' path).
TRAINS = {"fp32": "local", "bf16": "transformer_engine", "fp8_blockwise": "transformer_engine"}
PAD_MULTIPLE = 16  # TE's FP8 GEMMs want the token count a multiple of 16


@dataclass(frozen=True)
class ParityCell:
    shape: str  # an embedded dense shape (pytest_miles.models.embedded.SHAPES)
    rollout: str  # ROLLOUTS
    train: str  # TRAINS

    def __post_init__(self) -> None:
        from pytest_miles.models.embedded import SHAPES

        if self.shape not in SHAPES:
            raise InputError(f"ParityCell(shape={self.shape!r}): expected one of {', '.join(SHAPES)}")
        if self.rollout not in ROLLOUTS:
            raise InputError(f"ParityCell(rollout={self.rollout!r}): expected one of {', '.join(ROLLOUTS)}")
        if self.train not in TRAINS:
            raise InputError(f"ParityCell(train={self.train!r}): expected one of {', '.join(TRAINS)}")
        if self.rollout == "fp8_blockwise":
            cfg = SHAPES[self.shape]
            dims = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim,
                    cfg.num_key_value_heads * cfg.head_dim)
            if any(d % 128 for d in dims):
                raise InputError(f"ParityCell(shape={self.shape!r}, rollout='fp8_blockwise'): block-wise FP8 needs "
                                 f"every linear dim a multiple of 128, this shape has {dims}; expected a shape such "
                                 "as tiny128 or qwen2.5-0.5b")

    @property
    def id(self) -> str:
        """The pytest id: shape, rollout, train (selectable with -k)."""
        return f"{self.shape}-{self.rollout}-x-{self.train}"

    @property
    def serving(self) -> tuple[str, str]:
        """The engine configuration: cells that share it share one SGLang start."""
        return (self.shape, self.rollout)

    @property
    def needs_te(self) -> bool:
        return TRAINS[self.train] == "transformer_engine"

    @property
    def config(self):
        from pytest_miles.models.embedded import SHAPES

        return SHAPES[self.shape]

    def trainer_kwargs(self, seq_length: int = 64) -> dict[str, Any]:
        """Keywords for megatron_trainer_factory / rl_loop_factory.make_trainer (seed excluded)."""
        from pytest_miles.trainers.config import ModelArgs

        te = {"transformer_impl": "transformer_engine", "precision": self.train} if self.needs_te else {}
        return {"model": ModelArgs.qwen2(self.config, seq_length=seq_length), **te}

    def budget_key(self, backend: str | None, tp: int = 1) -> dict[str, Any]:
        """The key of parity_budgets.toml: model, rollout, train, attention backend, TP."""
        return {"model": self.shape, "rollout": self.rollout, "train": self.train, "backend": str(backend), "tp": tp}

    @property
    def pad_multiple(self) -> int | None:
        """Token counts the trainer needs a multiple of (FP8 GEMMs), else None."""
        return PAD_MULTIPLE if self.train.startswith("fp8") else None


def cell(name: str) -> ParityCell:
    """"shape:rollout:train" -> ParityCell (InputError naming the accepted form)."""
    parts = name.split(":") if isinstance(name, str) else []
    if len(parts) != 3:
        raise InputError(f"parity cell {name!r}: expected 'shape:rollout:train', e.g. 'tiny128:bf16:bf16'")
    return ParityCell(*parts)


# What the GPU parity test measures, in the order its engines start: tiny128 bf16 against the local spec (the
# budget of 2026-12-04) and TE bf16; the 0.5B shape (local and TE); block-wise FP8 rollout against TE bf16 and TE
# FP8 block-wise training.
CELLS = tuple(cell(c) for c in (
    "tiny128:bf16:fp32", "tiny128:bf16:bf16",
    "qwen2.5-0.5b:bf16:fp32", "qwen2.5-0.5b:bf16:bf16",
    "tiny128:fp8_blockwise:bf16", "tiny128:fp8_blockwise:fp8_blockwise",
))


def by_serving(cells: tuple[ParityCell, ...] | list[ParityCell]) -> list[ParityCell]:
    """The cells reordered (stably) so that those served by one engine configuration are adjacent:
    a test parametrized in this order starts each engine configuration once."""
    order: dict[tuple[str, str], list[ParityCell]] = {}
    for c in cells:
        order.setdefault(c.serving, []).append(c)
    return [c for group in order.values() for c in group]


def serve_weights(c: ParityCell, work: str | Path) -> tuple[Path, Path]:
    """-> (bf16_dir, serve_dir): the shape's bf16 HF checkpoint (what the trainer loads) and what
    SGLang serves (the same dir for bf16; a block-wise FP8 checkpoint quantized from it), each
    written once under `work`. A checkpoint SGLang's FP8 loader would refuse is an InputError."""
    from pytest_miles.models.embedded import write_hf_checkpoint
    from pytest_miles.models.quantized_checkpoints import check_sglang_layout, quantize_checkpoint_dir

    work = Path(work) / c.shape
    bf16 = work / "bf16"
    if not (bf16 / "config.json").exists():
        write_hf_checkpoint(bf16, c.config, dtype="bfloat16")
    if c.rollout == "bf16":
        return bf16, bf16
    serve = work / c.rollout
    if not (serve / "config.json").exists():
        quantize_checkpoint_dir(bf16, serve, c.rollout)
    problems = check_sglang_layout(serve)
    if problems:
        raise InputError(f"{c.id}: SGLang's FP8 loader would refuse {serve}: " + "; ".join(problems[:3]))
    return bf16, serve


PHASES = ("parity", "locate")  # parity on the production engine; the layer profile on the tensor-dump engine
PLANTED = cell("tiny128:bf16:fp32")  # where the planted-fault negative control runs (no TransformerEngine needed)


def schedule(cells, planted: ParityCell | None = PLANTED) -> list[tuple[ParityCell, str]]:
    """(cell, phase) in the order to run: per engine configuration, every cell's parity (production
    engine), then every cell's layer profile and the planted fault (the tensor-dump engine), so
    each of the two engines of a configuration starts once."""
    groups: dict[tuple[str, str], list[ParityCell]] = {}
    for c in by_serving(cells):
        groups.setdefault(c.serving, []).append(c)
    out: list[tuple[ParityCell, str]] = []
    for group in groups.values():
        out += [(c, "parity") for c in group] + [(c, "locate") for c in group]
        out += [(c, "planted") for c in group if c == planted]
    return out


def engine_starts(plan: list[tuple[ParityCell, str]]) -> int:
    """SGLang starts a plan costs with an engine factory that keeps one live configuration."""
    kinds = [(c.serving, "production" if phase == "parity" else "dump") for c, phase in plan]
    return sum(1 for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1])
