"""A mixture-of-experts shape as the block-wise FP8 HF checkpoint SGLang serves (Qwen3-MoE, the
layout of Qwen3-30B-A3B-FP8): every attention projection and every expert's gate/up/down as
float8_e4m3fn with a `<name>_scale_inv` of 128x128 FP32 blocks; the router (`mlp.gate`), the norms,
the embeddings and `lm_head` left in bf16. Quantized with the project's reference quantizer from the
very bf16 files the trainer loads (quantized_checkpoints.quantize_checkpoint_dir).

What SGLang 0.5.17 does with it, read in its sources (sglang/srt/):
- models/qwen3_moe.py:258-267: the experts are one FusedMoE per layer (`experts.w13_weight` = [gate; up],
  `experts.w2_weight` = down) built with the checkpoint's quant_config; :269-285: the router is a
  ReplicatedLinear built with no quant_config on the Fp8 path ("The online Fp8/mxfp8 path keeps the gate in
  bf16"), so an FP8 router would not load; :1114-1119 + layers/moe/fused_moe_triton/layer.py:1521-1546: the
  checkpoint's `mlp.experts.E.{gate,up,down}_proj.weight[_scale_inv]` map onto `experts.w13_`/`w2_` + the
  same suffix (the scales as `w13_weight_scale_inv` [E, 2 x ceil(I/128), ceil(H/128)], `w2_weight_scale_inv`
  [E, ceil(H/128), ceil(I/128)], fp32: layers/quantization/fp8.py:1266-1291).
- layers/quantization/fp8.py:1135-1140: block FP8 experts need moe_intermediate_size divisible by the block's
  128 rows, and :506-516 (validate_block_quant_shapes) every fused q/k/v partition (else a ValueError at load):
  `tiny-moe` (experts of 64, KV projection of 64 rows) cannot be served so, hence `tiny128-moe` here.
- fp8.py:2265-2281: on Hopper with no all-to-all backend the MoE runner is `auto` -> triton (DeepGEMM only with
  DeepEP/Mooncake/NIXL), whatever the attention backend; arg_groups/overrides.py:1283-1293 changes Qwen3-MoE's
  quantization/runner on sm100 only. layers/moe/moe_runner/triton_utils/fused_moe_triton_config.py:72,190: in
  deterministic mode the fused-MoE kernel runs one fixed tile config (BLOCK_SIZE_M/N/K 64/64/32) for every
  batch, the block-FP8 kernel included.
"""

from __future__ import annotations

from pathlib import Path

from pytest_miles.models.moe import MOE_SHAPES, MoeConfig, write_moe_checkpoint
from pytest_miles.models.quantized_checkpoints import SCALE_SUFFIX, check_sglang_layout, quantize_checkpoint_dir

BLOCK = 128
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# The smallest MoE shape whose every quantized dimension tiles into 128x128 blocks: hidden 256, 2 query heads
# and 1 KV head of 128, 8 experts of 128, top-2. Not a --miles-model-shape: the FP8 cells write it themselves.
TINY128_MOE = MoeConfig(vocab_size=512, hidden_size=256, moe_intermediate_size=128, num_experts=8,
                        num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=1, head_dim=128)
FP8_MOE_SHAPES: dict[str, MoeConfig] = {"tiny128-moe": TINY128_MOE,
                                        "qwen3-30b-a3b-2l": MOE_SHAPES["qwen3-30b-a3b-2l"]}


def fp8_moe_unsupported(cfg: MoeConfig) -> str | None:
    """Why SGLang's block FP8 loader would refuse this shape (None: it would not)."""
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.moe_intermediate_size
    dims = {"hidden_size": h, "moe_intermediate_size": f, "query projection rows": cfg.num_attention_heads * d,
            "key/value projection rows": cfg.num_key_value_heads * d}
    bad = [f"{k} {v}" for k, v in dims.items() if v % BLOCK]
    if not bad:
        return None
    return (f"block-wise FP8 needs {', '.join(bad)} to be multiples of {BLOCK} (SGLang's FP8 loader refuses expert "
            f"gate/up rows and fused q/k/v partitions that do not tile into {BLOCK}-row blocks; the quantizer here "
            f"tiles every linear dimension); shapes that fit: {', '.join(FP8_MOE_SHAPES)}")


def fp8_moe_config(shape: str | MoeConfig) -> MoeConfig:
    """A shape name (FP8_MOE_SHAPES) or a MoeConfig that block FP8 can serve; ValueError naming why not."""
    cfg = FP8_MOE_SHAPES.get(shape) if isinstance(shape, str) else shape
    if not isinstance(cfg, MoeConfig):
        raise ValueError(f"shape {shape!r}: expected a MoeConfig or one of {', '.join(FP8_MOE_SHAPES)}")
    reason = fp8_moe_unsupported(cfg)
    if reason:
        raise ValueError(f"shape {shape if isinstance(shape, str) else 'given as a MoeConfig'}: {reason}")
    return cfg


def write_fp8_moe_checkpoints(work: str | Path, shape: str | MoeConfig,
                              device: str | None = None) -> tuple[Path, Path]:
    """-> (bf16_dir, fp8_dir) under `work`: the shape's bf16 checkpoint (what the trainer loads) and its
    block-wise FP8 twin (what SGLang serves), quantized on `device` (the host by default). Written once:
    existing dirs are reused."""
    cfg = fp8_moe_config(shape)
    work = Path(work)
    bf16, fp8 = work / "bf16", work / "fp8_blockwise"
    if not (bf16 / "config.json").exists():
        write_moe_checkpoint(bf16, cfg)
    if not (fp8 / "config.json").exists():
        quantize_checkpoint_dir(bf16, fp8, "fp8_blockwise", device)
    return bf16, fp8


def expert_weight_names(cfg: MoeConfig) -> list[str]:
    return [f"model.layers.{n}.mlp.experts.{e}.{p}.weight" for n in range(cfg.num_hidden_layers)
            for e in range(cfg.num_experts) for p in EXPERT_PROJECTIONS]


def check_moe_fp8_layout(path: str | Path, cfg: MoeConfig) -> list[str]:
    """What SGLang's qwen3_moe + fp8 loaders would reject or silently mis-serve here (empty: nothing):
    check_sglang_layout's per-tensor rules, plus every expert of every layer quantized with its scale,
    and every router left unquantized."""
    from safetensors import safe_open

    path = Path(path)
    problems = check_sglang_layout(path)
    reason = fp8_moe_unsupported(cfg)
    if reason:
        problems.append(reason)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        dtypes = {n: f.get_slice(n).get_dtype() for n in names}
    missing = [n for n in expert_weight_names(cfg) if dtypes.get(n) != "F8_E4M3" or n + SCALE_SUFFIX not in names]
    if missing:
        problems.append(f"{len(missing)} expert weight(s) not FP8 with a scale, e.g. {missing[0]}: SGLang's FusedMoE "
                        "would load the rest of the layer's experts as FP8 and this one without its scale")
    for n in range(cfg.num_hidden_layers):
        gate = f"model.layers.{n}.mlp.gate.weight"
        if gate not in names:
            problems.append(f"{gate}: missing (the router)")
        elif dtypes[gate] == "F8_E4M3" or gate + SCALE_SUFFIX in names:
            problems.append(f"{gate}: quantized; SGLang's Qwen3-MoE router is built without a quant config and "
                            "loads bf16 only")
    return problems
