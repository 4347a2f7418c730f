"""Values compared by meaning, not bytes: tensors bit for bit (then where and by how much they
differ), numpy arrays, floats by their bits (NaN equals NaN), objects field by field; and the
--ignore globs, which remember what they matched.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

from pytest_miles.checks.compare_report import Difference
from pytest_miles.ckpt.lazy import LazyTensor, flatten_values

__all__ = ["Ignore", "is_tensor", "leaf_diff", "objects_diff"]


def is_tensor(x: Any) -> bool:
    torch = __import__("sys").modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def leaf_diff(name: str, x: Any, y: Any, first: bool = False) -> Difference | None:
    """The difference of two leaves, or None; `first`: a tensor's in --first's words (`as_first_only`)."""
    from pytest_miles.checks.bits import bits_equal, tensor_diff

    if isinstance(x, LazyTensor):
        x = x.materialize()
    if isinstance(y, LazyTensor):
        y = y.materialize()
    if is_tensor(x) or is_tensor(y):
        if not (is_tensor(x) and is_tensor(y)):
            return Difference("object", name,
                              f"{name}: tensor on one side only ({type(x).__name__} vs {type(y).__name__})")
        if x.dtype != y.dtype:
            return Difference("dtype", name, f"{name}: dtype {x.dtype} vs {y.dtype}")
        if tuple(x.shape) != tuple(y.shape):
            return Difference("shape", name, f"{name}: shape {list(x.shape)} vs {list(y.shape)}")
        if bits_equal(x, y):
            return None
        d = tensor_diff(name, x, y)
        d = d.as_first_only() if first else d
        return Difference("tensor", name, d.render(), data=d.to_json())
    np = __import__("sys").modules.get("numpy")
    if np is not None and (isinstance(x, np.ndarray) or isinstance(y, np.ndarray)):
        same = (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype == y.dtype
                and x.shape == y.shape and x.tobytes() == y.tobytes())
        return None if same else Difference("object", name, f"{name}: numpy arrays differ")
    if type(x) is not type(y):
        return Difference("object", name, f"{name}: {type(x).__name__} {x!r:.80} vs {type(y).__name__} {y!r:.80}")
    if isinstance(x, float):
        if math.isnan(x) and math.isnan(y) or x.hex() == y.hex():
            return None
        return Difference("object", name, f"{name}: {x!r} vs {y!r}")
    try:
        same = bool(x == y)
    except Exception:
        same = False
    if not same and hasattr(x, "__dict__") and hasattr(y, "__dict__"):
        sub = objects_diff(name, vars(x), vars(y))
        return sub[0] if sub else None
    return None if same else Difference("object", name, f"{name}: {x!r:.120} vs {y!r:.120}")


def objects_diff(name: str, x: Any, y: Any, ignore: Ignore | None = None) -> list[Difference]:
    fx, fy = flatten_values(x, name), flatten_values(y, name)
    diffs = []
    for key in dict.fromkeys([*fx, *fy]):
        if ignore is not None and ignore(key):
            continue
        if key not in fy:
            diffs.append(Difference("missing", key, f"{key}: only in A"))
        elif key not in fx:
            diffs.append(Difference("extra", key, f"{key}: only in B"))
        else:
            d = leaf_diff(key, fx[key], fy[key])
            if d is not None:
                diffs.append(d)
    return diffs


class Ignore:
    """--ignore globs, matched against the names the report prints; remembers which matched."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns, self.used = patterns, set()

    def __call__(self, name: str) -> bool:
        for p in self.patterns:
            if fnmatch.fnmatchcase(name, p):
                self.used.add(p)
                return True
        return False

    def unmatched(self) -> list[str]:
        return [p for p in self.patterns if p not in self.used]
