"""SGLang's `get_weights_by_name`, as the embedded engines answer it, so the served-weights check
runs against the same semantics on CPU as on the GPU. What SGLang 0.5.x answers (first rows,
float32, fused parameters narrowed, 400 on failure): docs/precision.md."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

FAILED = "Get parameter by name failed"  # SGLang's message for a None result (HTTP 400)
DEFAULT_TRUNCATE_SIZE = 100  # GetWeightsByNameReqInput's default


def weights_by_name(weights: Mapping[str, Any], name: str, truncate_size: int = DEFAULT_TRUNCATE_SIZE, *,
                    tied: bool = False) -> list | None:
    """SGLang's answer for `name` from an HF-named weight map: the first `truncate_size` rows as
    float32 values in nested lists, or None where SGLang answers "failed"."""
    import torch

    if name == "lm_head.weight" and tied:
        name = "model.embed_tokens.weight"
    t = weights.get(name)
    if t is None or t.dim() == 0:  # SGLang: KeyError / slicing a float -> logged, None
        return None
    return t.detach().cpu().to(torch.float32).numpy().tolist()[:truncate_size]


def json_value(values: list) -> list:
    """What ORJSONResponse writes: non-finite floats as null (JSON has no NaN)."""
    def fix(v):
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v if math.isfinite(v) else None

    flat = values
    while flat and isinstance(flat[0], list):
        flat = [x for row in flat for x in row]
    return values if all(math.isfinite(v) for v in flat) else fix(values)


def parse_request(body: Any) -> tuple[str, int]:
    """GetWeightsByNameReqInput's validation: `name` a string, `truncate_size` an integer (default
    100). ValueError with FastAPI's kind of message, answered as HTTP 422."""
    if not isinstance(body, dict):
        raise ValueError(f"body: expected a JSON object with 'name' (and 'truncate_size'), got {type(body).__name__}")
    name = body.get("name")
    if not isinstance(name, str):
        raise ValueError(f"name: field required, a string (got {name!r})")
    size = body.get("truncate_size", DEFAULT_TRUNCATE_SIZE)
    if isinstance(size, str) and size.strip().lstrip("-").isdigit():
        size = int(size)  # pydantic's lax mode parses integer strings
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"truncate_size: an integer is required (got {size!r})")
    return name, size
