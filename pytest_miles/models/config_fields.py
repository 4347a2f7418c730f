"""What a model shape's fields must be, checked where a config object is made (torchtitan's validated config
dataclasses): a config.json a user hands us fails here, naming the field and what is accepted, not deep in torch
with "unsupported operand type(s) for //" or "int too big to convert"."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from pytest_miles.errors import InputError

MAX_SIZE = 2**31 - 1  # sizes index torch tensors and CUDA grids: int32
FLOATS = ("rope_theta", "rms_norm_eps")
BOOLS = ("tie_word_embeddings", "norm_topk_prob")


def check_fields(cfg: Any) -> None:
    """InputError for the first field of `cfg` (a TinyConfig or MoeConfig) that no model can have."""
    for f in fields(cfg):
        name, value = f.name, getattr(cfg, f.name)
        if name in BOOLS:
            if not isinstance(value, bool):
                raise _bad(name, "true or false", value)
        elif name in FLOATS:
            top = 1.0 if name == "rms_norm_eps" else 1e15  # torch takes the theta as a float32 power's base
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 < value <= top:
                raise _bad(name, f"a number in (0, {top:g}]", value)
        elif name == "seed":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise _bad(name, "an integer in [0, 2**63)", value)
        elif isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
            raise _bad(name, f"an integer in [1, {MAX_SIZE}]", value)
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise InputError(f"model config: num_attention_heads ({cfg.num_attention_heads}) is not a multiple of "
                         f"num_key_value_heads ({cfg.num_key_value_heads}); grouped-query attention needs one")
    experts = getattr(cfg, "num_experts", None)
    if experts is not None and cfg.num_experts_per_tok > experts:
        raise InputError(f"model config: num_experts_per_tok ({cfg.num_experts_per_tok}) is more than num_experts "
                         f"({experts})")


def _bad(name: str, expected: str, value: Any) -> InputError:
    return InputError(f"model config field {name!r}: expected {expected}, got {value!r:.60}")
