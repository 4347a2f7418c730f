"""A tensor as where its bytes are (file or buffer, offset, size, stride, dtype), read only when its
values are needed: what the restricted unpickler builds for every tensor of a `torch.save` pickle.

Why: comparing checkpoints compares bytes first; only where bytes differ are values decoded, so
torch is imported and a tensor materialised only then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pytest_miles._files import SafeFile
from pytest_miles.ckpt.model import flatten
from pytest_miles.errors import CheckpointError

__all__ = ["LazyTensor", "Storage", "check_tensors", "flatten_values", "materialize"]

# Every dtype torch.save writes (2.13: `_rebuild_tensor_v2` with a typed storage, or `_v3` with an
# untyped storage and the dtype): bytes per element.
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1, "complex32": 4, "complex64": 8, "complex128": 16, "uint16": 2,
             "uint32": 4, "uint64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1,
             "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1, "bits8": 1, "bits16": 2,
             "bits1x8": 1, "bits2x4": 1, "bits4x2": 1}
ITEMSIZE = _ITEMSIZE


@dataclass
class Storage:
    """Bytes [offset, offset + nbytes) of `source` (a file path or an in-memory buffer)."""

    source: Any = field(repr=False)
    offset: int = 0
    nbytes: int = 0
    dtype: str = "uint8"


@dataclass
class LazyTensor:
    """A tensor as where its bytes are: materialised only when values are needed."""

    storage: Storage
    offset: int  # in elements
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.size:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    def is_contiguous(self) -> bool:
        expected = 1
        for s, st in zip(reversed(self.size), reversed(self.stride)):
            if s != 1 and st != expected:
                return False
            expected *= s
        return True

    def byte_span(self) -> tuple[int, int]:
        """(offset, length) in the source of the bytes this tensor's elements may live in."""
        if self.numel == 0:
            return self.storage.offset, 0
        last = self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride))
        return self.storage.offset + self.offset * self.itemsize, (last - self.offset + 1) * self.itemsize

    def check(self, where: str) -> None:
        if any(s < 0 for s in self.size) or any(st < 0 for st in self.stride) or self.offset < 0:
            raise CheckpointError(f"{where}: tensor with negative size/stride/offset")
        off, length = self.byte_span()
        if off + length > self.storage.offset + self.storage.nbytes:
            raise CheckpointError(f"{where}: tensor of size {list(self.size)} reaches past its storage "
                                  f"({self.storage.nbytes} bytes)")

    def read(self) -> bytes:
        off, length = self.byte_span()
        src = self.storage.source
        if isinstance(src, (bytes, bytearray, memoryview)):
            return bytes(src[off:off + length])
        with SafeFile(src) as f:
            return f.pread(off, length, "tensor data")

    def materialize(self):
        import torch

        dtype = getattr(torch, self.dtype)
        data = bytearray(self.read())
        # as bytes, then viewed: frombuffer does not take every dtype (FP8, bits, complex32)
        flat = torch.frombuffer(data, dtype=torch.uint8).view(dtype) if data else torch.empty(0, dtype=dtype)
        first = 0
        return torch.as_strided(flat, self.size, self.stride, first).clone()



def check_tensors(obj: Any, where: str, depth: int = 0) -> None:
    if depth > 200:
        return
    if isinstance(obj, LazyTensor):
        obj.check(where)
    elif isinstance(obj, dict):
        for v in obj.values():
            check_tensors(v, where, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            check_tensors(v, where, depth + 1)


def materialize(obj: Any) -> Any:
    """Replace every LazyTensor in a container by a real torch tensor."""
    if isinstance(obj, LazyTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        return type(obj)((k, materialize(v)) for k, v in obj.items()) if type(obj) is not dict else {
            k: materialize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [materialize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(materialize(v) for v in obj)
    return obj


def flatten_values(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested containers -> {key.path: leaf}, tensors materialised, so that differences have a name."""
    out: dict[str, Any] = {}
    flatten(materialize(obj), prefix, out)
    return out
