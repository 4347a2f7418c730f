"""Every embedded shape by name, dense and mixture-of-experts (`--miles-model-shape`), and the
one place that tells which architecture a model directory holds."""

from __future__ import annotations

from pathlib import Path

from pytest_miles.models.embedded import SHAPES as DENSE_SHAPES
from pytest_miles.models.embedded import TinyConfig, TinyDecoder, config_from_hf, init_weights, read_hf_config
from pytest_miles.models.embedded import write_shape as write_dense_shape
from pytest_miles.models.moe import (
    MOE_SHAPES,
    MoeConfig,
    MoeDecoder,
    init_moe_weights,
    is_moe_config,
    moe_config_from_hf,
    write_moe_checkpoint,
)

SHAPES: dict[str, TinyConfig | MoeConfig] = {**DENSE_SHAPES, **MOE_SHAPES}


def write_shape(path: str | Path, shape: str, dtype: str = "bfloat16") -> Path:
    """The embedded model of this shape (dense or MoE) as an HF checkpoint."""
    if shape not in SHAPES:
        raise ValueError(f"model shape {shape!r}: expected one of {', '.join(SHAPES)}")
    if shape in MOE_SHAPES:
        return write_moe_checkpoint(path, MOE_SHAPES[shape], dtype)
    return write_dense_shape(path, shape, dtype)


def config_of_dir(path: str | Path) -> TinyConfig | MoeConfig:
    """A model directory's config.json as the embedded config of its architecture."""
    raw = read_hf_config(path)
    where = Path(path) / "config.json"
    return moe_config_from_hf(raw, where) if is_moe_config(raw) else config_from_hf(raw, where)


def decoder_class(cfg: TinyConfig | MoeConfig) -> type[TinyDecoder]:
    return MoeDecoder if isinstance(cfg, MoeConfig) else TinyDecoder


def init_any_weights(cfg: TinyConfig | MoeConfig) -> dict:
    return init_moe_weights(cfg) if isinstance(cfg, MoeConfig) else init_weights(cfg)
