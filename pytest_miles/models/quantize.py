"""Reference quantizers in torch (CPU and GPU), exact to the formats of the Miles low-precision matrix.

FP8 block-wise (128x128, FP32 scales), MXFP8 (1x32, UE8M0) and NVFP4 (1x16 FP8 + per-tensor FP32);
`fake_quant(x, fmt)` is what the rollout and training paths compute with. Formats, padding and
NaN handling: docs/precision.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass
class Quantized:
    values: Any  # float8_e4m3fn tensor, or E2M1 values as float32 (no torch dtype for 4-bit)
    scales: Any  # fp32 (fp8 blocks), uint8 biased exponents (mxfp8), fp8 e4m3 (nvfp4 blocks)
    tensor_scale: Any = None  # nvfp4's per-tensor fp32 scale
    block: tuple[int, int] = (1, 1)
    shape: tuple[int, ...] = ()


def _blocks(x, block: tuple[int, int]):
    """x [..., M, N] (1-D as [1, N]) -> zero-padded view [..., Mb, bm, Nb, bn] and original shape."""
    import torch

    shape = tuple(x.shape)
    if x.dim() == 1:
        x = x[None]
    bm, bn = block
    m, n = x.shape[-2:]
    pm, pn = (-m) % bm, (-n) % bn
    if pm or pn:
        x = torch.nn.functional.pad(x, (0, pn, 0, pm))
    mb, nb = x.shape[-2] // bm, x.shape[-1] // bn
    return x.reshape(*x.shape[:-2], mb, bm, nb, bn), shape


def _unblock(xb, shape: tuple[int, ...]):
    *lead, mb, bm, nb, bn = xb.shape
    x = xb.reshape(*lead, mb * bm, nb * bn)
    if len(shape) == 1:
        return x[0, : shape[0]]
    return x[..., : shape[-2], : shape[-1]]


def _amax(xb):
    import torch

    return torch.nan_to_num(xb.float(), nan=0.0, posinf=0.0, neginf=0.0).abs().amax(dim=(-3, -1), keepdim=True)


def _to_e4m3(x):
    import torch

    finite = torch.nan_to_num(x, nan=0.0, posinf=E4M3_MAX, neginf=-E4M3_MAX).clamp(-E4M3_MAX, E4M3_MAX)
    return torch.where(torch.isnan(x), x, finite).to(torch.float8_e4m3fn)


def quantize_fp8_blockwise(x, block: tuple[int, int] = (128, 128)) -> Quantized:
    import torch

    xb, shape = _blocks(x.float(), block)
    amax = _amax(xb)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).to(torch.float32)
    q = _to_e4m3(xb / scale)
    return Quantized(q, scale.squeeze(-1).squeeze(-2), None, block, shape)


def quantize_mxfp8(x, block: int = 32) -> Quantized:
    import torch

    xb, shape = _blocks(x.float(), (1, block))
    amax = _amax(xb)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=2.0**-127))) - 8, torch.full_like(amax, -127.0))
    exp = exp.clamp(-127, 127)
    scale = torch.exp2(exp)
    q = _to_e4m3(xb / scale)
    return Quantized(q, (exp + 127).to(torch.uint8).squeeze(-1).squeeze(-2), None, (1, block), shape)


def _round_e2m1(x):
    import torch

    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x.device)
    mag = torch.nan_to_num(x.abs(), nan=0.0, posinf=E2M1_MAX).clamp(max=E2M1_MAX)
    idx = (mag[..., None] - grid).abs().argmin(dim=-1)  # ties go to the smaller magnitude
    out = grid[idx] * torch.sign(x)
    return torch.where(torch.isnan(x), x, out)


def quantize_nvfp4(x, block: int = 16) -> Quantized:
    import torch

    xf = x.float()
    tensor_amax = torch.nan_to_num(xf, nan=0.0, posinf=0.0, neginf=0.0).abs().amax()
    tscale = (tensor_amax / (E4M3_MAX * E2M1_MAX)).clamp(min=torch.finfo(torch.float32).tiny).to(torch.float32)
    xb, shape = _blocks(xf, (1, block))
    amax = _amax(xb)
    bscale = _to_e4m3(amax / E2M1_MAX / tscale)
    eff = bscale.float() * tscale
    q = _round_e2m1(torch.where(eff > 0, xb / eff, torch.zeros_like(xb)))
    return Quantized(q, bscale.squeeze(-1).squeeze(-2), tscale, (1, block), shape)


def dequantize(qt: Quantized):
    import torch

    if qt.tensor_scale is not None:  # nvfp4
        scale = qt.scales.float()[..., :, None, :, None] * qt.tensor_scale
    elif qt.scales.dtype == torch.uint8:  # mxfp8: biased exponents
        scale = torch.exp2(qt.scales.float() - 127)[..., :, None, :, None]
    else:
        scale = qt.scales[..., :, None, :, None]
    return _unblock(qt.values.float() * scale, qt.shape)


QUANTIZERS = {"fp8_blockwise": quantize_fp8_blockwise, "mxfp8": quantize_mxfp8, "nvfp4": quantize_nvfp4}


def fake_quant(x, fmt: str):
    """Quantize to `fmt` and back, in x's dtype. `bf16` is a plain cast."""
    import torch

    if fmt == "bf16":
        return x.to(torch.bfloat16)
    if fmt not in QUANTIZERS:
        raise ValueError(f"unknown precision format {fmt!r}; known: bf16, {', '.join(QUANTIZERS)}")
    return dequantize(QUANTIZERS[fmt](x)).to(torch.bfloat16)
