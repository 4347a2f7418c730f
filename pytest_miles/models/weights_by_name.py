"""SGLang's `get_weights_by_name`, as the embedded engines answer it, so the served-weights check
(`pytest_miles.checks.served_weights`) runs against the same semantics on CPU as on the GPU.

What SGLang 0.5.x does (read in sgl-project/sglang, python/sglang/srt/, in the stored recent
sources, not pinned to the 0.5.17 tag; the GPU test checks it against 0.5.17 itself):
- `entrypoints/http_server.py`: `@app.api_route("/get_weights_by_name", methods=["GET", "POST"])`
  takes a `GetWeightsByNameReqInput` JSON body; a `None` result answers HTTP 400
  `{"error": {"message": "Get parameter by name failed"}}` (`_create_error_response`), anything
  else HTTP 200 with the value (ORJSONResponse: non-finite floats become `null`).
- `managers/io_struct.py`: `GetWeightsByNameReqInput(name: str, truncate_size: int = 100)`;
  a body that does not validate is FastAPI's HTTP 422.
- `managers/tokenizer_manager.py` (`get_weights_by_name`): dp_size 1 answers the one value,
  dp_size > 1 a list with one value per data-parallel rank.
- `model_executor/model_runner.py` (`get_weights_by_name`): `model.get_weights_by_name(name,
  truncate_size, tp_size=...)`; any exception (an unknown name, a model class without the method)
  is logged and answers `None`. Its own TODO says "Add support for Qwen models", and
  sgl-project/sglang#5066 ("get_weights_by_name Not Supported by All Models", Qwen2.5) was
  closed inactive: a Qwen2 model may answer "failed" for every name.
- `models/llama.py` (`LlamaForCausalLM.get_weights_by_name`; read in `models/granite.py`, which
  carries the same method; SGLang's test/srt/test_get_weights_by_name.py drives it on Llama):
  HF names in; `lm_head.weight` of a tied model answers `embed_tokens.weight`; `q_proj`/`k_proj`/
  `v_proj` and `gate_proj`/`up_proj` are mapped onto the fused `qkv_proj`/`gate_up_proj`
  parameter and `narrow`ed to their rows (so the answer equals the HF tensor); with tp_size > 1
  column-parallel tensors answer this rank's shard and o_proj/down_proj are all-gathered on dim 1.
  The value is `weight.cpu().to(torch.float32).numpy().tolist()[:truncate_size]`: the FIRST
  `truncate_size` ROWS (dim 0), every element converted to float32 (exact for bf16, fp16, FP8).
- `entrypoints/engine.py`: the offline `Engine.get_weights_by_name(name, truncate_size=100)`
  returns the same value, `None` where the server would answer 400.
"""

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
