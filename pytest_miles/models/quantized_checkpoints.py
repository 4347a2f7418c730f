"""The embedded model as the quantized HF checkpoints SGLang serves with its own kernels: block-wise
FP8 (DeepSeek-style, Hopper and Blackwell) and MXFP8 (the Miles low-precision matrix's layout,
Blackwell only). The layout follows what SGLang's FP8 loader checks: docs/precision.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pytest_miles.facts.precision import unsupported_on
from pytest_miles.models.embedded import (
    SHAPES,
    TinyConfig,
    load_safetensors_dir,
    read_hf_config,
    write_hf_checkpoint,
)

# A shape whose every linear weight dimension is a multiple of 128 (the default tiny model's
# 64-wide KV projection is not): hidden 256, 2 heads x head_dim 128, 1 KV head, MLP 512.
TINY128 = SHAPES["tiny128"]  # every linear dim a multiple of 128 (the default tiny model's k_proj is 64 wide)

LINEAR_WEIGHTS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                  "up_proj.weight", "down_proj.weight")
# Fused in SGLang's Qwen2 (qkv_proj, gate_up_proj): every partition must fit the block rows.
FUSED_PARTITIONS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
FP8_NOT_CONVERTED = ["lm_head", "model.embed_tokens"]  # norms and biases are not linear layers
# The Miles low-precision guide (tools/convert_hf_to_mxfp8.py): "every 2D *.weight tensor whose last dim is divisible by
# 32, except layernorm, embed, router, mlp.gate., norm, lm_head, eh_proj, weights_proj".
MXFP8_SKIP = ("layernorm", "embed", "router", "mlp.gate.", "norm", "lm_head", "eh_proj", "weights_proj")

QUANT_CONFIGS: dict[str, dict[str, Any]] = {
    "fp8_blockwise": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                      "weight_block_size": [128, 128], "modules_to_not_convert": FP8_NOT_CONVERTED},
    # The low-precision guide's rewritten HF config, field for field.
    "mxfp8": {"quant_method": "mxfp8", "fmt": "e4m3", "weight_block_size": [1, 32], "scale_fmt": "ue8m0",
              "activation_scheme": "dynamic"},
}
SCALE_SUFFIX = "_scale_inv"


def quantized_names(state: dict, fmt: str) -> list[str]:
    """The tensors `fmt` quantizes. Block FP8 refuses a linear weight that does not tile into
    128x128 blocks (SGLang's fused q/k/v would reject it at load), naming it."""
    if fmt == "fp8_blockwise":
        names = [k for k in state if k.endswith(LINEAR_WEIGHTS)]
        bad = [f"{k} {tuple(state[k].shape)}" for k in names if any(d % 128 for d in state[k].shape)]
        if bad:
            raise ValueError(f"block-wise FP8 needs linear weight dims that are multiples of 128; not: "
                             f"{', '.join(bad)} (use TINY128 or a model whose projections are)")
        return names
    if fmt == "mxfp8":
        return [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2 and v.shape[-1] % 32 == 0
                and not any(s in k for s in MXFP8_SKIP)]
    raise ValueError(f"fmt {fmt!r}: expected one of {', '.join(QUANT_CONFIGS)}")


def quantize_state(state: dict, fmt: str, device: str | None = None) -> dict:
    """bf16 HF state -> the quantized HF state: `<w>` float8_e4m3fn + `<w>_scale_inv` (on the host).
    `device`: where each weight is quantized, one at a time (e.g. "cuda" for a large MoE); the host by default."""
    import torch

    from pytest_miles.models.quantize import quantize_fp8_blockwise, quantize_mxfp8

    out = dict(state)
    for name in quantized_names(state, fmt):
        w = state[name].to(device or "cpu").float()
        q = quantize_fp8_blockwise(w) if fmt == "fp8_blockwise" else quantize_mxfp8(w)
        values = q.values.reshape(q.values.shape[0] * q.block[0], -1)[: w.shape[0], : w.shape[1]]
        out[name] = values.contiguous().cpu()
        scale_dtype = torch.float32 if fmt == "fp8_blockwise" else torch.uint8
        out[name + SCALE_SUFFIX] = q.scales.to(scale_dtype).contiguous().cpu()
    return out


def write_quantized_checkpoint(path: str | Path, fmt: str, cfg: TinyConfig = TINY128, tokenizer: bool = False) -> Path:
    """The embedded model (config + seed) as an `fmt` HF checkpoint in `path`; its bf16 twin is
    what the trainer holds. Returns `path`."""
    from safetensors.torch import load_file, save_file

    if fmt not in QUANT_CONFIGS:
        raise ValueError(f"fmt {fmt!r}: expected one of {', '.join(QUANT_CONFIGS)}")
    path = write_hf_checkpoint(path, cfg, dtype="bfloat16", tokenizer=tokenizer)
    state = quantize_state(load_file(str(path / "model.safetensors")), fmt)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = QUANT_CONFIGS[fmt]
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def quantize_checkpoint_dir(src: str | Path, path: str | Path, fmt: str, device: str | None = None) -> Path:
    """A user's own bf16/fp32 HF Qwen2 checkpoint (`--miles-model`) as an `fmt` HF checkpoint in
    `path`: its weights cast to bf16 (what the trainer holds), quantized as above; config.json with
    `quantization_config`; tokenizer files copied. Safetensors only (nothing is unpickled)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    if fmt not in QUANT_CONFIGS:
        raise ValueError(f"fmt {fmt!r}: expected one of {', '.join(QUANT_CONFIGS)}")
    src, path = Path(src), Path(path)
    config = read_hf_config(src)
    if config.get("quantization_config"):
        raise ValueError(f"{src}: already quantized ({config['quantization_config'].get('quant_method')}); "
                         "give the bf16 checkpoint")
    if not any(src.glob("*.safetensors")):
        raise ValueError(f"{src}: no *.safetensors (pickled .bin checkpoints are not read)")
    state = {k: v.to(torch.bfloat16) for k, v in load_safetensors_dir(src).items()}
    quantized = quantize_state(state, fmt, device)  # refuses a shape the blocks do not fit, before anything is written
    path.mkdir(parents=True, exist_ok=True)
    save_file(quantized, str(path / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = QUANT_CONFIGS[fmt]
    config["torch_dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "generation_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, path / name)
    return path


def dequantized_state(path: str | Path) -> dict:
    """A quantized checkpoint read back as fp32 weights (what its FP8 GEMMs multiply with)."""
    import torch
    from safetensors.torch import load_file

    from pytest_miles.models.quantize import Quantized, dequantize

    path = Path(path)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    block = tuple(qc["weight_block_size"])
    state = load_file(str(path / "model.safetensors"))
    out = {}
    for name, t in state.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = state.get(name + SCALE_SUFFIX)
        if scale is None:
            out[name] = t.float()
            continue
        n, k = t.shape
        pad = torch.zeros(-(-n // block[0]) * block[0], -(-k // block[1]) * block[1], dtype=torch.float32)
        pad[:n, :k] = t.float()
        values = pad.reshape(pad.shape[0] // block[0], block[0], pad.shape[1] // block[1], block[1])
        out[name] = dequantize(Quantized(values, scale, None, block, (n, k)))
    return out


def check_sglang_layout(path: str | Path) -> list[str]:
    """What SGLang's fp8.py would reject in this checkpoint (empty: nothing). Mirrors
    Fp8Config.__init__/from_config and create_fp8_weight_/validate_block_quant_shapes (module doc);
    `sglang_fp8_config` runs SGLang's own parser where sglang is importable."""
    import torch
    from safetensors import safe_open

    path = Path(path)
    problems: list[str] = []
    qc = json.loads((path / "config.json").read_text()).get("quantization_config")
    if not isinstance(qc, dict):
        return [f"{path / 'config.json'}: no quantization_config"]
    method = qc.get("quant_method")
    if method not in ("fp8", "mxfp8"):
        problems.append(f"quant_method {method!r}: SGLang's Fp8Config takes 'fp8' or 'mxfp8'")
    if qc.get("activation_scheme") != "dynamic":
        problems.append(f"activation_scheme {qc.get('activation_scheme')!r}: block quantization needs 'dynamic'")
    block = qc.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        return problems + [f"weight_block_size {block!r}: two positive ints"]
    if method == "mxfp8" and block != [1, 32]:
        problems.append(f"weight_block_size {block}: MXFP8 requires [1, 32]")
    bn, bk = block
    scale_dtype = torch.uint8 if method == "mxfp8" else torch.float32
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        for name in sorted(names):
            if name.endswith(SCALE_SUFFIX):
                if name[: -len(SCALE_SUFFIX)] not in names:
                    problems.append(f"{name}: a scale without its weight")
                continue
            t = f.get_slice(name)
            dtype, shape = t.get_dtype(), tuple(t.get_shape())
            if dtype != "F8_E4M3":
                if name.endswith(LINEAR_WEIGHTS) and method == "fp8" and not _ignored(name, qc):
                    problems.append(f"{name}: {dtype}, a linear SGLang loads as float8_e4m3fn (not in "
                                    "modules_to_not_convert)")
                continue
            sname = name + SCALE_SUFFIX
            if sname not in names:
                problems.append(f"{name}: FP8 without {sname}")
                continue
            s = f.get_tensor(sname)
            want = (-(-shape[0] // bn), -(-shape[1] // bk))
            if tuple(s.shape) != want or s.dtype != scale_dtype:
                problems.append(f"{sname}: {s.dtype} {tuple(s.shape)}, SGLang registers {scale_dtype} {want}")
            if name.endswith(FUSED_PARTITIONS) and shape[0] % bn:
                problems.append(f"{name}: {shape[0]} rows, a fused partition must be a multiple of {bn}")
    return problems


def _ignored(name: str, qc: dict) -> bool:
    skip = (qc.get("ignored_layers") or []) + (qc.get("modules_to_not_convert") or [])
    return any(s.removeprefix("model.") in name for s in skip)


def sglang_fp8_config(path: str | Path):
    """SGLang's own parse of the checkpoint's quantization_config (needs sglang)."""
    from sglang.srt.layers.quantization.fp8 import Fp8Config

    return Fp8Config.from_config(json.loads((Path(path) / "config.json").read_text())["quantization_config"])


def serve_unsupported(fmt: str, hardware) -> str | None:
    """Why this machine's GPU cannot serve `fmt` (the low-precision guide: MXFP8 on Blackwell only), or None."""
    return unsupported_on([fmt], hardware)
