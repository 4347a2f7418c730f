"""The TransformerEngine trainer path: what Miles trains with (`--transformer-impl
transformer_engine --bf16 [--fp8-format e4m3 --fp8-recipe blockwise|mxfp8]`), next to the
local-spec fp32 path that stays the CPU default.

Names are resolved by `TrainerConfig`, the machine is checked before any rank starts
(`check_te_machine`), and the rest runs inside a rank. Why attention defaults to "unfused" and
bf16 needs Float16Module: docs/trainers.md.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from pytest_miles.errors import (  # noqa: F401  (importable here too)
    InputError,
    PrecisionUnsupported,
    TrainerError,
    TransformerEngineUnavailable,
)

TRANSFORMER_IMPLS = ("local", "transformer_engine")
TE_PRECISIONS = ("bf16", "fp8_blockwise", "mxfp8", "nvfp4")
ATTENTION_BACKENDS = ("unfused", "fused", "flash", "auto")
DEFAULT_ATTENTION_BACKEND = "unfused"
TE_INSTALL = ("install TransformerEngine 2.17.1 for PyTorch (pip install 'transformer_engine[pytorch]==2.17.1'; "
              "on a host without a package index, build TransformerEngine's PyTorch extension from its "
              "source distribution as the pytest-miles trainers guide describes, docs/trainers.md)")

# Precision -> megatron-core 0.16.1 TransformerConfig fields (transformer_config.py: fp8 'e4m3',
# fp8_recipe Fp8Recipe.blockwise / .mxfp8; fp4 'e2m1', fp4_recipe Fp4Recipe.nvfp4, "NVFP4BlockScaling
# recipe, requires TE >= 2.7.0.dev0"). NVFP4 is wired but refused by the precision rules (no GPU runs it yet).
RECIPES: dict[str, dict[str, str]] = {
    "bf16": {},
    "fp8_blockwise": {"fp8": "e4m3", "fp8_recipe": "blockwise"},
    "mxfp8": {"fp8": "e4m3", "fp8_recipe": "mxfp8"},
    "nvfp4": {"fp4": "e2m1", "fp4_recipe": "nvfp4"},
}


def te_importable() -> bool:
    try:
        return importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):
        return False


def resolve_te_options(transformer_impl: Any, precision: Any,
                       attention_backend: Any) -> tuple[str, str | None]:
    """-> (precision, attention_backend) with the defaults filled in, or an InputError naming the
    argument. Names only: `TrainerConfig` calls it when it is built."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise InputError(f"transformer_impl {transformer_impl!r}: expected one of "
                         f"{', '.join(TRANSFORMER_IMPLS)}")
    if transformer_impl == "local":
        if precision not in (None, "fp32"):
            raise InputError(f"precision {precision!r}: the local layer spec trains in fp32; bf16/FP8 need "
                             "transformer_impl='transformer_engine'")
        if attention_backend is not None:
            raise InputError(f"attention_backend {attention_backend!r}: a TransformerEngine option; "
                             "the local layer spec has one attention implementation")
        return "fp32", None
    precision = precision or "bf16"
    if precision not in TE_PRECISIONS:
        raise InputError(f"precision {precision!r}: expected one of {', '.join(TE_PRECISIONS)} with "
                         "transformer_impl='transformer_engine'")
    attention_backend = attention_backend or DEFAULT_ATTENTION_BACKEND
    if attention_backend not in ATTENTION_BACKENDS:
        raise InputError(f"attention_backend {attention_backend!r}: expected one of "
                         f"{', '.join(ATTENTION_BACKENDS)}")
    return precision, attention_backend


def check_te_machine(transformer_impl: str, precision: str, device: str, hardware=None) -> None:
    """Whether this machine can train the TransformerEngine path in `precision` (names are checked
    by `TrainerConfig`): PrecisionUnsupported (the precision rules refuse this GPU),
    TransformerEngineUnavailable, or a TrainerError for a device other than cuda. Runs before
    any rank starts, so a refused configuration never costs a launch."""
    if transformer_impl != "transformer_engine":
        return
    from pytest_miles.facts.hardware import discover
    from pytest_miles.facts.precision import unsupported_on

    hw = hardware if hardware is not None else discover()
    reason = unsupported_on([precision], hw)
    if reason:
        raise PrecisionUnsupported(f"precision {precision!r} with transformer_impl='transformer_engine': {reason}")
    if not te_importable():
        raise TransformerEngineUnavailable(
            "transformer_impl='transformer_engine' needs the transformer_engine package, which is not importable "
            f"here; {TE_INSTALL}")
    if device != "cuda":
        raise TrainerError(f"device {device!r}: transformer_impl='transformer_engine' runs on cuda only")


def rank_env(precision: str | None) -> dict[str, str]:
    """Environment the ranks need for `precision`, as Miles' actor env has it (the Miles
    low-precision matrix: "Set NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1 ... to use FP32 scales
    (miles/ray/actor_group.py already sets this)"): TE's block-wise recipe then uses FP32 scales, as the FP8
    checkpoint SGLang serves does, instead of powers of two. It must be there at launch: TE reads it when
    it is imported."""
    import os

    if precision != "fp8_blockwise":
        return {}
    return {"NVTE_FP8_BLOCK_SCALING_FP32_SCALES": os.environ.get("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", "1")}


def te_config(config, spec: dict[str, Any]):
    """The rank's local TransformerConfig turned into Miles' TE configuration: bf16 params, the
    precision's recipe, the attention backend (deterministic mode stays as the trainer set it)."""
    import dataclasses

    import torch
    from megatron.core.transformer.enums import AttnBackend

    # Fusions stay as the trainer set them (off; megatron-core's defaults are off too, as in
    # te-check.py's bitwise-reproducible runs on the host).
    overrides = dict(params_dtype=torch.bfloat16, bf16=True, pipeline_dtype=torch.bfloat16,
                     attention_backend=AttnBackend[spec.get("attention_backend") or DEFAULT_ATTENTION_BACKEND],
                     **RECIPES[spec.get("precision") or "bf16"])
    if "moe_grouped_gemm" in spec:
        overrides["moe_grouped_gemm"] = spec["moe_grouped_gemm"]
    # TransformerConfig.__post_init__ derives fields from others: rebuild from the init fields.
    init = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    init.update(overrides)
    return type(config)(**init)


def te_config_and_spec(config, spec: dict[str, Any]):
    """`te_config` and megatron-core's TransformerEngine layer spec (needs transformer_engine). A
    mixture-of-experts model gets the spec with experts (megatron-core 0.16.1 gpt_layer_specs.py
    `get_gpt_layer_with_transformer_engine_spec(num_experts=, moe_grouped_gemm=, qk_layernorm=)`):
    TEGroupedMLP (TE GroupedLinear, FP8 through TE's recipe, tokens per expert padded by Fp8Padding,
    experts.py TEGroupedMLP.forward) or a SequentialMLP of TE linears."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    m = spec.get("model") or {}
    if not m.get("num_moe_experts"):
        return te_config(config, spec), get_gpt_layer_with_transformer_engine_spec()
    grouped = bool(m.get("moe_grouped_gemm", True))
    return te_config(config, {**spec, "moe_grouped_gemm": grouped}), get_gpt_layer_with_transformer_engine_spec(
        num_experts=m["num_moe_experts"], moe_grouped_gemm=grouped, qk_layernorm=bool(m.get("qk_layernorm")))


def wrap_bf16(model):
    """Float16Module, as Megatron's training loop does for --bf16: every param in bf16 (the learned
    position embedding stays fp32 otherwise, and TE refuses mixed input/param dtypes) and the
    output back to fp32. Its state_dict/sharded_state_dict are the wrapped model's."""
    from megatron.core.transformer.module import Float16Module

    return Float16Module(model.config, model)


def te_facts(spec: dict[str, Any]) -> dict[str, Any]:
    """What ran, for the run's facts: versions, recipe, and the attention backend TE selected
    (read from TE's backend-selection cache after the first forward; NVTE_DEBUG=1
    NVTE_DEBUG_LEVEL=2 prints the same choice in the rank log)."""
    import os

    import transformer_engine

    facts: dict[str, Any] = {"transformer_impl": "transformer_engine", "precision": spec.get("precision") or "bf16",
                             "recipe": RECIPES[spec.get("precision") or "bf16"],
                             "attention_backend_requested": spec.get("attention_backend") or DEFAULT_ATTENTION_BACKEND,
                             "transformer_engine": transformer_engine.__version__,
                             # megatron's LanguageModule sets NVTE_{FLASH,FUSED,UNFUSED}_ATTN from attention_backend
                             **{k: os.environ.get(k) for k in ("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "NVTE_FLASH_ATTN",
                                                               "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN",
                                                               "NVTE_FP8_BLOCK_SCALING_FP32_SCALES")}}
    facts["attention_backend_selected"] = selected_attention_backend()
    return facts


def selected_attention_backend() -> str:
    """TE's own record of its last choice (transformer_engine/pytorch/attention/dot_product_attention/
    dot_product_attention.py keeps `_attention_backends`), or why it could not be read."""
    try:
        from transformer_engine.pytorch.attention.dot_product_attention import dot_product_attention as dpa
    except ImportError as exc:
        return f"unknown (TE's backend record not importable: {exc}; run with NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2)"
    rec = getattr(dpa, "_attention_backends", None)
    if not isinstance(rec, dict):
        return "unknown (TE keeps no _attention_backends here; run with NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2)"
    if rec.get("use_flash_attention"):
        return f"FlashAttention ({rec.get('flash_attention_backend')})"
    if rec.get("use_fused_attention"):
        return f"FusedAttention (cuDNN, {rec.get('fused_attention_backend')})"
    if rec.get("use_unfused_attention"):
        return "UnfusedDotProductAttention"
    return f"none recorded ({ {k: v for k, v in rec.items() if k != 'attention_params'} })"
