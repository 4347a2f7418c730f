"""Every embedded shape by name, dense and mixture-of-experts (`--miles-model-shape`), and the
one place that tells which architecture a model directory holds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_miles.models.embedded import SHAPES as DENSE_SHAPES
from pytest_miles.models.embedded import TinyConfig, TinyDecoder, config_from_hf, init_weights, read_hf_config
from pytest_miles.models.embedded import tensor_specs as dense_specs
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
from pytest_miles.models.moe import tensor_specs as moe_specs

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


def check_weights(cfg: TinyConfig | MoeConfig, state: dict[str, Any], where: str | Path) -> None:
    """The weights must be the ones config.json describes (every tensor there, of its shape), as SGLang's loader
    insists: a mismatch found here is named, not a wrong-sized matmul at the first forward. Extra tensors are
    let be (HF checkpoints carry some: an lm_head beside tied embeddings, rotary buffers)."""
    from pytest_miles.errors import InputError

    specs = moe_specs(cfg) if isinstance(cfg, MoeConfig) else dense_specs(cfg)
    missing = [n for n in specs if n not in state]
    if missing:
        raise InputError(f"{where}: {len(missing)} tensor(s) that config.json describes are not in the weights, "
                         f"first {missing[0]}")
    for name, shape in specs.items():
        found = tuple(state[name].shape)
        if found != shape:
            raise InputError(f"{where}: {name} is {list(found)} in the weights, config.json describes {list(shape)}")


def decoder_class(cfg: TinyConfig | MoeConfig) -> type[TinyDecoder]:
    return MoeDecoder if isinstance(cfg, MoeConfig) else TinyDecoder


def init_any_weights(cfg: TinyConfig | MoeConfig) -> dict:
    return init_moe_weights(cfg) if isinstance(cfg, MoeConfig) else init_weights(cfg)


@dataclass(frozen=True)
class AttentionLayout:
    """What an HF config.json says of its attention, read once for every reader of it (KV pool sizes,
    FlashInfer's modules): a field it does not give, or gives as something other than a positive
    integer, is None."""

    layers: int | None
    heads: int | None
    kv_heads: int | None  # num_key_value_heads, else num_attention_heads
    head_dim: int | None  # head_dim, else hidden_size // num_attention_heads
    dtype: str  # torch_dtype (transformers < 5) or dtype (5), else bfloat16
    sliding_window: bool  # use_sliding_window or sliding_window_pattern
    mixed_layers: bool  # layer_types other than full attention
    mla: bool  # kv_lora_rank: multi-head latent attention


def attention_layout(config: dict[str, Any]) -> AttentionLayout:
    """The attention of a config.json (a multimodal one's text_config)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

    def positive(value: Any) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    heads = positive(text.get("num_attention_heads"))
    hidden = positive(text.get("hidden_size"))
    layer_types = text.get("layer_types") if isinstance(text.get("layer_types"), list) else []
    return AttentionLayout(
        layers=positive(text.get("num_hidden_layers")), heads=heads,
        kv_heads=positive(text.get("num_key_value_heads")) or heads,
        head_dim=positive(text.get("head_dim")) or (positive(hidden // heads) if hidden and heads else None),
        dtype=str(text.get("torch_dtype") or text.get("dtype") or "bfloat16"),
        sliding_window=bool(text.get("use_sliding_window") or text.get("sliding_window_pattern")),
        mixed_layers=bool(set(layer_types) - {"full_attention"}), mla=bool(text.get("kv_lora_rank")))
