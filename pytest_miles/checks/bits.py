"""Bit-level comparison of two tensors: what differs, where first, and by how much."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

_INT_VIEW = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


@dataclass
class TensorDiff:
    name: str
    dtype: str
    shape: tuple[int, ...]
    differing: int | None  # None: --first, not counted
    total: int
    first_index: tuple[int, ...]
    value_a: str
    value_b: str
    bits_a: str
    bits_b: str
    max_abs_diff: float | None
    max_ulp: int | None
    nan_mismatches: int = 0
    first_only: bool = False  # --first: the first differing element alone, the rest not compared

    def render(self) -> str:
        idx = ", ".join(str(i) for i in self.first_index)
        if self.first_only:
            return (f"{self.name}: first differing element at [{idx}] ({self.dtype}, shape {list(self.shape)}): "
                    f"{self.value_a} ({self.bits_a}) vs {self.value_b} ({self.bits_b}); --first: the rest not compared")
        text = (f"{self.name}: {self.differing} of {self.total} elements differ ({self.dtype}, shape "
                f"{list(self.shape)}); first at [{idx}]: {self.value_a} ({self.bits_a}) vs "
                f"{self.value_b} ({self.bits_b})")
        if self.max_abs_diff is not None:
            text += f"; max abs diff {self.max_abs_diff:.6g}"
        if self.max_ulp is not None:
            text += f", max ULP distance {self.max_ulp}"
        if self.nan_mismatches:
            text += f", {self.nan_mismatches} differ in NaN-ness or NaN payload"
        return text

    def as_first_only(self) -> TensorDiff:
        """The same difference in --first's words: the first differing element alone, nothing counted (what
        the native reader reports; the decoded path says the same where that reader was not built)."""
        from dataclasses import replace

        return replace(self, differing=None, max_abs_diff=None, max_ulp=None, nan_mismatches=0, first_only=True)

    def to_json(self) -> dict[str, Any]:
        out = {**asdict(self), "shape": list(self.shape), "first_index": list(self.first_index)}
        if not self.first_only:
            del out["first_only"]  # the full report's JSON as it always was
        return out


def _int_view(t):
    import torch

    size = t.element_size()
    if t.dtype == torch.bool:
        return t.view(torch.uint8).to(torch.int16)
    return t.view(getattr(torch, _INT_VIEW[size]))


def bits_equal(a, b) -> bool:
    """dtype, shape and every bit (NaN payloads, signed zeros) equal."""
    import torch

    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if a.numel() == 0:
        return True
    return bool(torch.equal(_byte_view(a), _byte_view(b)))


def _byte_view(t):
    """The tensor's bytes (any dtype: FP8, FP4, bits, complex128 have no integer twin to index)."""
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _opaque(t) -> bool:
    """Dtypes torch cannot index or compare elementwise on CPU (bits*, float4 pairs) or without an
    integer of their width (complex128): compared as rows of bytes."""
    name = str(t.dtype)
    return t.element_size() not in _INT_VIEW or name.startswith(("torch.bits", "torch.float4"))


def tensor_diff(name: str, a, b) -> TensorDiff | None:
    """None when bitwise equal; else the report of where and how they differ. Same dtype/shape."""
    import torch

    fa = a.detach().contiguous().reshape(-1)
    fb = b.detach().contiguous().reshape(-1)
    if _opaque(fa):
        return _opaque_diff(name, a, fa, fb)
    ia, ib = _int_view(fa), _int_view(fb)
    ne = ia != ib
    count = int(ne.sum())
    if count == 0:
        return None
    first = int(torch.argmax(ne.to(torch.uint8)))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), tuple(a.shape))) if a.dim() else ()
    width = fa.element_size() * 8

    def bits(x) -> str:
        return f"0x{int(x) & ((1 << width) - 1):0{width // 4}x}"

    va, vb = fa[first], fb[first]
    max_abs = max_ulp = None
    nan_mismatch = 0
    if fa.is_floating_point():
        da = fa[ne].to(torch.float64)
        db = fb[ne].to(torch.float64)
        nan_mask = da.isnan() | db.isnan()
        nan_mismatch = int(nan_mask.sum())
        finite = ~nan_mask
        if bool(finite.any()):
            max_abs = float((da[finite] - db[finite]).abs().max())
            sa, sb = ia[ne].to(torch.int64), ib[ne].to(torch.int64)
            mag = (1 << (width - 1)) - 1
            oa = torch.where(sa < 0, -(sa & mag), sa)
            ob = torch.where(sb < 0, -(sb & mag), sb)
            max_ulp = int((oa - ob)[finite].abs().max())
    elif not fa.is_complex():
        max_abs = float((fa[ne].to(torch.float64) - fb[ne].to(torch.float64)).abs().max())
    return TensorDiff(
        name=name, dtype=str(a.dtype).replace("torch.", ""), shape=tuple(a.shape), differing=count,
        total=fa.numel(), first_index=index, value_a=repr(va.item()), value_b=repr(vb.item()),
        bits_a=bits(ia[first]), bits_b=bits(ib[first]), max_abs_diff=max_abs, max_ulp=max_ulp,
        nan_mismatches=nan_mismatch,
    )


def _opaque_diff(name: str, a, fa, fb) -> TensorDiff | None:
    import torch

    size = fa.element_size()
    ra, rb = _byte_view(fa).reshape(-1, size), _byte_view(fb).reshape(-1, size)
    ne = (ra != rb).any(dim=1)
    count = int(ne.sum())
    if count == 0:
        return None
    first = int(torch.argmax(ne.to(torch.uint8)))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), tuple(a.shape))) if a.dim() else ()

    def bits(row) -> str:  # little-endian bytes as one hexadecimal number
        return "0x" + bytes(row.tolist())[::-1].hex()

    return TensorDiff(name=name, dtype=str(a.dtype).replace("torch.", ""), shape=tuple(a.shape), differing=count,
                      total=fa.numel(), first_index=index, value_a=bits(ra[first]), value_b=bits(rb[first]),
                      bits_a=bits(ra[first]), bits_b=bits(rb[first]), max_abs_diff=None, max_ulp=None,
                      nan_mismatches=0)
