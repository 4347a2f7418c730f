"""Where two stored tensors differ, from their bytes: only the differing elements are decoded.

Why: one flipped byte in a 64 MiB tensor used to cost importing torch (seconds) and decoding both
whole tensors (hundreds of MiB); what the report says (how many elements differ, the first one with
its value and bits, the largest absolute and ULP distance, NaN mismatches) needs only the differing
elements. The native reader lists them (`diff_elements`: block memcmp, then element by element only
inside differing blocks) and this module decodes them with `struct`, as torch would print them
(`TensorDiff`, the same figures as `bits.tensor_diff`). Tensors stored otherwise (strided, other
chunk layouts on the two sides), exotic dtypes, or more than LIMIT differing elements: None, the caller
decodes with torch.
"""

from __future__ import annotations

import math
import os
import struct
from array import array
from typing import Any

from pytest_miles.checks.bits import TensorDiff
from pytest_miles.ckpt.model import ITEMSIZE, CheckpointEntry, CheckpointError, numel

__all__ = ["LIMIT", "element_diff", "element_first"]

LIMIT = 1 << 16  # differing elements decoded here; beyond that, torch is quicker
_RAW = ("raw", ("raw",), ("pt", "contiguous"))
_FLOATS = {"float64": "d", "float32": "f", "float16": "e", "bfloat16": "bf16"}
_INTS = {"int64": "q", "int32": "i", "int16": "h", "int8": "b", "uint8": "B", "uint16": "H", "uint32": "I",
         "uint64": "Q", "bool": "?"}
_SIGNED = {1: "b", 2: "h", 4: "i", 8: "q"}


def _raw_range(e: CheckpointEntry) -> tuple[Any, int, int] | None:
    """(file, offset, length) of a tensor's elements, row-major, when it is stored as one chunk
    covering it (see _chunk_range); else None."""
    if e.kind != "tensor" or len(e.chunks) != 1 or e.dtype not in ITEMSIZE:
        return None
    offsets, sizes, item = e.chunks[0]
    if any(offsets) or tuple(sizes) != tuple(e.shape or ()):
        return None
    return _chunk_range(e, sizes, item)


def _chunk_range(e: CheckpointEntry, sizes: tuple[int, ...], item: Any) -> tuple[Any, int, int] | None:
    """(file, offset, length) of one chunk's elements, row-major: stored raw, or as a torch.save blob
    of one contiguous tensor (a DCP item, read in place); else None."""
    nbytes = numel(sizes) * ITEMSIZE[e.dtype or "uint8"]
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


def _chunk_ranges(e: CheckpointEntry) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple]] | None:
    """[(chunk offsets, chunk sizes, (file, offset, length))] of every chunk, or None."""
    if e.kind != "tensor" or e.dtype not in ITEMSIZE or not e.chunks:
        return None
    out = []
    for offsets, sizes, item in e.chunks:
        r = _chunk_range(e, tuple(sizes), item)
        if r is None:
            return None
        out.append((tuple(offsets), tuple(sizes), r))
    return out


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


def _alike(native: Any, ea: CheckpointEntry, eb: CheckpointEntry) -> tuple | None:
    """(dtype, itemsize, shape, chunk ranges A, chunk ranges B) of two tensors decodable here, chunked
    alike; else None."""
    dtype = ea.dtype or ""
    if native is None or dtype not in _FLOATS and dtype not in _INTS:
        return None
    ca, cb = _chunk_ranges(ea), _chunk_ranges(eb)
    if ca is None or cb is None or [c[:2] for c in ca] != [c[:2] for c in cb]:
        return None
    return dtype, ITEMSIZE[dtype], tuple(ea.shape or ()), ca, cb


def element_diff(native: Any, ea: CheckpointEntry, eb: CheckpointEntry) -> TensorDiff | None:
    """The TensorDiff of two stored tensors of equal dtype, shape and chunk layout (Megatron stores a
    layer-stacked tensor as one chunk per layer), read from their files without torch; None where
    this does not apply (the caller decodes the tensors instead)."""
    alike = _alike(native, ea, eb)
    if alike is None:
        return None
    dtype, size, shape, ca, cb = alike
    total, index, parts_a, parts_b = 0, [], [], []
    for (offsets, sizes, ra), (_, _, rb) in zip(ca, cb):
        found = _diff(native, ra, rb, size, LIMIT - total)
        if found is None:
            return None  # the full decode names the problem
        count, local, raw_a, raw_b = found
        total += count
        if total > LIMIT:
            return None  # too many: torch is quicker
        index.extend(_ravel([o + i for o, i in zip(offsets, _unravel(k, sizes))], shape) for k in local)
        parts_a.append(raw_a)
        parts_b.append(raw_b)
    if total == 0:
        return None  # no difference (the caller's bytes said otherwise: let it look)
    return _figures(ea, dtype, size, total, index, b"".join(parts_a), b"".join(parts_b))


def element_first(native: Any, ea: CheckpointEntry, eb: CheckpointEntry) -> TensorDiff | None:
    """--first: the first differing element (row-major) of two stored tensors laid out alike, its index,
    values and bits alone (`first_only`): each chunk is read up to its first differing byte, nothing
    is counted; None where this does not apply (the caller decodes the tensors instead)."""
    from pytest_miles._files import SafeFile

    alike = _alike(native, ea, eb)
    if alike is None:
        return None
    dtype, size, shape, ca, cb = alike
    best = None  # (flat index, bytes A, bytes B)
    for (offsets, sizes, ra), (_, _, rb) in zip(ca, cb):
        with SafeFile(ra[0]) as fa, SafeFile(rb[0]) as fb:
            if ra[1] + ra[2] > fa.size or rb[1] + rb[2] > fb.size:
                return None  # the full decode names the problem
            try:
                at = native.first_diff(fa.fd, ra[1], fb.fd, rb[1], ra[2])
                if at < 0:
                    if at == -2:
                        return None
                    continue
                k = at // size
                raw_a, raw_b = os.pread(fa.fd, size, ra[1] + k * size), os.pread(fb.fd, size, rb[1] + k * size)
            except (OSError, EOFError) as exc:
                raise CheckpointError(f"{ra[0]} / {rb[0]}: read failed ({exc})") from None
        if len(raw_a) != size or len(raw_b) != size:
            return None
        flat = _ravel([o + i for o, i in zip(offsets, _unravel(k, sizes))], shape)
        if best is None or flat < best[0]:
            best = (flat, raw_a, raw_b)
    if best is None:
        return None  # no difference (the caller's bytes said otherwise: let it look)
    flat, raw_a, raw_b = best
    (va,), (vb,) = _values(dtype, raw_a, 1), _values(dtype, raw_b, 1)
    width = size * 8
    code = _SIGNED[size] if dtype != "bool" else "B"
    (sa,), (sb,) = struct.unpack(f"<{code}", raw_a), struct.unpack(f"<{code}", raw_b)
    mask = (1 << width) - 1
    return TensorDiff(name=ea.name, dtype=dtype, shape=shape, differing=None, total=numel(shape),
                      first_index=_unravel(flat, shape), value_a=repr(va), value_b=repr(vb),
                      bits_a=f"0x{sa & mask:0{width // 4}x}", bits_b=f"0x{sb & mask:0{width // 4}x}",
                      max_abs_diff=None, max_ulp=None, first_only=True)


def _diff(native: Any, ra: tuple, rb: tuple, size: int, limit: int) -> tuple[int, list[int], bytes, bytes] | None:
    """The native diff_elements of two byte ranges: (count, element indices, bytes A, bytes B)."""
    from pytest_miles._files import SafeFile

    with SafeFile(ra[0]) as fa, SafeFile(rb[0]) as fb:
        if ra[1] + ra[2] > fa.size or rb[1] + rb[2] > fb.size:
            return None
        try:
            count, index, raw_a, raw_b = native.diff_elements(fa.fd, ra[1], fb.fd, rb[1], ra[2], size, max(limit, 0))
        except (OSError, EOFError) as exc:
            raise CheckpointError(f"{ra[0]} / {rb[0]}: read failed ({exc})") from None
    return count, array("q", index).tolist(), raw_a, raw_b


def _ravel(index: list[int], shape: tuple[int, ...]) -> int:
    flat = 0
    for i, s in zip(index, shape):
        flat = flat * s + i
    return flat


def _figures(e: CheckpointEntry, dtype: str, size: int, count: int, index: list[int], raw_a: bytes,
             raw_b: bytes) -> TensorDiff:
    """What bits.tensor_diff reports, from the differing elements alone."""
    va, vb = _values(dtype, raw_a, count), _values(dtype, raw_b, count)
    k0 = min(range(count), key=index.__getitem__)  # the first in the tensor's row-major order
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
                      first_index=_unravel(index[k0], shape), value_a=repr(va[k0]), value_b=repr(vb[k0]),
                      bits_a=f"0x{sa[k0] & mask:0{width // 4}x}", bits_b=f"0x{sb[k0] & mask:0{width // 4}x}",
                      max_abs_diff=max_abs, max_ulp=max_ulp, nan_mismatches=nan)
