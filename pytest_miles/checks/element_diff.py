"""Where two stored tensors differ, from their bytes: only the differing elements are decoded.

Why: one flipped byte in a 64 MiB tensor used to cost importing torch (seconds) and decoding both
whole tensors (hundreds of MiB); what the report says (how many elements differ, the first one with
its value and bits, the largest absolute and ULP distance, NaN mismatches) needs only the differing
elements. The native reader lists them (`diff_elements`: block memcmp, then element by element only
inside differing blocks) and this module decodes them with `struct`, as torch would print them
(`TensorDiff`, the same figures as `bits.tensor_diff`). Tensors stored otherwise (sharded, strided,
or not one contiguous tensor), exotic dtypes, or more than LIMIT differing elements: None, the caller
decodes with torch.
"""

from __future__ import annotations

import math
import struct
from array import array
from typing import Any

from pytest_miles.checks.bits import TensorDiff
from pytest_miles.ckpt.model import ITEMSIZE, CheckpointEntry, CheckpointError, numel

__all__ = ["LIMIT", "element_diff"]

LIMIT = 1 << 16  # differing elements decoded here; beyond that, torch is quicker
_RAW = ("raw", ("raw",), ("pt", "contiguous"))
_FLOATS = {"float64": "d", "float32": "f", "float16": "e", "bfloat16": "bf16"}
_INTS = {"int64": "q", "int32": "i", "int16": "h", "int8": "b", "uint8": "B", "uint16": "H", "uint32": "I",
         "uint64": "Q", "bool": "?"}
_SIGNED = {1: "b", 2: "h", 4: "i", 8: "q"}


def _raw_range(e: CheckpointEntry) -> tuple[Any, int, int] | None:
    """(file, offset, length) of a tensor's elements, row-major, when it is stored as one chunk
    covering it, raw or as a torch.save blob of one contiguous tensor (a DCP item); else None."""
    if e.kind != "tensor" or len(e.chunks) != 1 or e.dtype not in ITEMSIZE:
        return None
    offsets, sizes, item = e.chunks[0]
    nbytes = numel(e.shape) * ITEMSIZE[e.dtype]
    if any(offsets) or tuple(sizes) != tuple(e.shape or ()):
        return None
    if item.encoding in _RAW:
        return (item.file, item.offset, item.length) if item.length == nbytes else None
    if item.encoding != ("torch.save", False):
        return None
    from pytest_miles.ckpt.lazy import LazyTensor
    from pytest_miles.ckpt.torch_save import load_torch

    try:  # only the blob's zip directory and pickle are read, in place
        t = load_torch(item.file, f"{item.file} (item {item.key!r} at byte {item.offset})", (item.offset, item.length))
    except CheckpointError:
        return None  # the full decode names the problem
    if not isinstance(t, LazyTensor) or t.dtype != e.dtype or tuple(t.size) != tuple(sizes) or not t.is_contiguous():
        return None
    offset, length = t.byte_span()
    return (item.file, offset, length) if length == nbytes else None


def _values(dtype: str, raw: bytes, n: int) -> list[Any]:
    """The Python values of n elements (as torch's `.item()` gives them)."""
    code = _FLOATS.get(dtype) or _INTS[dtype]
    if code == "bf16":  # the top half of a float32
        return list(struct.unpack(f"<{n}f", b"".join(b"\0\0" + raw[2 * k:2 * k + 2] for k in range(n))))
    return list(struct.unpack(f"<{n}{code}", raw))


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        out.append(flat % s)
        flat //= s
    return tuple(reversed(out))


def element_diff(native: Any, ea: CheckpointEntry, eb: CheckpointEntry) -> TensorDiff | None:
    """The TensorDiff of two stored tensors of equal dtype and shape, read from their files without
    torch; None where this does not apply (the caller decodes the tensors instead)."""
    dtype = ea.dtype or ""
    if native is None or dtype not in _FLOATS and dtype not in _INTS:
        return None
    ra, rb = _raw_range(ea), _raw_range(eb)
    if ra is None or rb is None:
        return None
    from pytest_miles._files import SafeFile

    size = ITEMSIZE[dtype]
    with SafeFile(ra[0]) as fa, SafeFile(rb[0]) as fb:
        if ra[1] + ra[2] > fa.size or rb[1] + rb[2] > fb.size:
            return None  # the full decode names the problem
        try:
            count, index, raw_a, raw_b = native.diff_elements(fa.fd, ra[1], fb.fd, rb[1], ra[2], size, LIMIT)
        except (OSError, EOFError) as exc:
            raise CheckpointError(f"{ra[0]} / {rb[0]}: read failed ({exc})") from None
    if count == 0 or count > LIMIT:
        return None  # no difference (the caller's bytes said otherwise: let it look) or too many
    return _figures(ea, dtype, size, count, array("q", index).tolist(), raw_a, raw_b)


def _figures(e: CheckpointEntry, dtype: str, size: int, count: int, index: list[int], raw_a: bytes,
             raw_b: bytes) -> TensorDiff:
    """What bits.tensor_diff reports, from the differing elements alone."""
    va, vb = _values(dtype, raw_a, count), _values(dtype, raw_b, count)
    width = size * 8
    bits_of = (lambda raw: struct.unpack(f"<{count}{_SIGNED[size]}", raw)) if dtype != "bool" else (
        lambda raw: struct.unpack(f"<{count}B", raw))
    sa, sb = bits_of(raw_a), bits_of(raw_b)
    max_abs = max_ulp = None
    nan = 0
    if dtype in _FLOATS:
        mag = (1 << (width - 1)) - 1
        finite = [k for k in range(count) if not (math.isnan(va[k]) or math.isnan(vb[k]))]
        nan = count - len(finite)
        if finite:
            max_abs = max(abs(float(va[k]) - float(vb[k])) for k in finite)
            max_ulp = max(abs((-(sa[k] & mag) if sa[k] < 0 else sa[k]) - (-(sb[k] & mag) if sb[k] < 0 else sb[k]))
                          for k in finite)
    else:
        max_abs = max(abs(float(va[k]) - float(vb[k])) for k in range(count))
    shape = tuple(e.shape or ())
    mask = (1 << width) - 1
    return TensorDiff(name=e.name, dtype=dtype, shape=shape, differing=count, total=numel(shape),
                      first_index=_unravel(index[0], shape), value_a=repr(va[0]), value_b=repr(vb[0]),
                      bits_a=f"0x{sa[0] & mask:0{width // 4}x}", bits_b=f"0x{sb[0] & mask:0{width // 4}x}",
                      max_abs_diff=max_abs, max_ulp=max_ulp, nan_mismatches=nan)
