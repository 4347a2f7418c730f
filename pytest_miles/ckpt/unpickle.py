"""The one pickle reader for checkpoints: nothing in the file is ever called.

Why: `.pt` files, DCP `.metadata` and non-tensor items, Megatron's `common.pt` and legacy
`model_optim_rng.pt` are pickles from other machines and people; `torch.load(weights_only=False)`
runs whatever they name. Here every global is resolved by `find_class` to one of: a few builtins
that only build data (dict, set, OrderedDict, argparse.Namespace, numpy arrays), our own tensor
rebuild (lazy: a byte range, read when needed), or an inert stand-in class for unknown classes
(holds its fields, compares by value). A function or a class from a module that runs things
(os, subprocess, builtins.eval, ...) is refused: `UnsafePickle` names it, the caller names the file.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any

from pytest_miles.ckpt.lazy import LazyTensor, Storage
from pytest_miles.errors import (
    CheckpointError,
    UnsafePickle,  # noqa: F401  (importable here too)
)

__all__ = ["RestrictedUnpickler", "UnsafePickle", "load_pickle"]


class _StubBase:
    """Stand-in for a class from the file: holds its fields, compares by value, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args:
            self.args = args
        self.__dict__.update(kwargs)

    # dict/list subclasses are rebuilt by SETITEM/APPENDS on the object: keep what they hold
    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("list", []).extend(values)

    def _key(self) -> tuple:
        return (type(self).__name__, tuple(sorted((k, _freeze(v)) for k, v in self.__dict__.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _StubBase) and self._key() == other._key()

    def __hash__(self) -> int:
        try:  # fast for plain fields (DCP MetadataIndex: fqn, offset, index), exact otherwise
            return hash((type(self).__name__, *self.__dict__.items()))
        except TypeError:
            return hash(self._key())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


class _Stub(_StubBase):
    """For classes with custom pickled state (a tuple, ...): kept as `state`."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(isinstance(x, (dict, type(None))) for x in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:  # a custom __getstate__ (TensorProperties: (dtype, layout, requires_grad, ...))
            self.state = state
            if type(self).__name__ == "TensorProperties" and isinstance(state, tuple) and state:
                self.dtype = state[0]


class _DataStub(_StubBase):
    """For dataclasses whose pickled state is a dict or (dict, slots): pickle's C code fills
    __dict__ directly (no Python call per object: a 20,000-tensor `.metadata` stays fast)."""


class _TensorProperties(list):
    """DCP's TensorProperties, whose pickled state is a tuple (dtype, layout, requires_grad,
    memory_format, pin_memory): kept as the list of those values. BUILD calls list.extend, C code,
    no Python call per tensor (one per tensor of a `.metadata`: 20,000 calls otherwise)."""

    __setstate__ = list.extend

    @property
    def dtype(self) -> Any:
        return self[0] if self else None

    @property
    def state(self) -> tuple:
        return tuple(self)

    def __repr__(self) -> str:
        return f"TensorProperties({', '.join(map(repr, self))})"


class _MetadataIndex(_StubBase):
    """DCP's MetadataIndex (fqn, offset, index): only ever a key of `storage_data`, which is read by
    iterating it; hashed by identity (C code) instead of by value (a Python call per key)."""

    __hash__ = object.__hash__


# torch.distributed.checkpoint's metadata dataclasses (plain dict / slots state)
_DATA_CLASSES = {"Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
                 "BytesStorageMetadata", "StorageMeta", "_StorageInfo"}


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted(((repr(k), _freeze(x)) for k, x in v.items())))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, LazyTensor):
        return ("tensor", v.dtype, v.size, v.stride, v.offset, v.storage.nbytes)
    return v


class _Ref:
    """A torch global (dtype, layout, helper function) named, not imported; a call is recorded."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any) -> _Ref:
        return _Ref(f"{self.name}{args!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Ref) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8", "UInt16Storage": "uint16",
    "UInt32Storage": "uint32", "UInt64Storage": "uint64", "Float8_e4m3fnStorage": "float8_e4m3fn",
    "Float8_e5m2Storage": "float8_e5m2", "Float8_e4m3fnuzStorage": "float8_e4m3fnuz",
    "Float8_e5m2fnuzStorage": "float8_e5m2fnuz", "Float8_e8m0fnuStorage": "float8_e8m0fnu",
}


@dataclass(frozen=True)
class _StorageType:
    dtype: str



def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any, *rest: Any) -> LazyTensor:
    if not isinstance(storage, Storage):
        raise pickle.UnpicklingError("tensor rebuild without a storage")
    return LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride),
                      storage.dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None, *state: Any) -> Any:
    return data


# Modules whose classes run things on construction: refused by name, never stubbed.
_DENY_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "shutil", "socket", "importlib", "runpy",
    "code", "codeop", "ctypes", "pickle", "_pickle", "marshal", "types", "functools", "operator", "pty", "io", "_io",
    "webbrowser", "multiprocessing", "threading", "_thread", "signal", "tempfile", "asyncio", "platform", "gc",
    "inspect", "pdb", "bdb", "timeit", "trace", "profile", "cProfile", "distutils", "setuptools", "pip", "site",
    "ensurepip", "venv", "zipimport", "pkgutil", "sqlite3", "urllib", "http", "ftplib", "smtplib", "telnetlib",
    "xmlrpc", "logging", "glob", "fileinput", "shelve", "dbm", "tarfile", "zipfile", "copy", "copyreg", "_codecs",
    "codecs", "posixpath", "ntpath", "uuid", "select", "selectors", "mmap", "resource", "fcntl", "termios",
}
_SAFE = {
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "tuple"),
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "object"), ("builtins", "bytearray"),
    ("builtins", "bytes"), ("builtins", "complex"), ("builtins", "slice"), ("builtins", "range"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "str"), ("builtins", "bool"),
    ("argparse", "Namespace"), ("datetime", "datetime"), ("datetime", "date"), ("datetime", "timedelta"),
    ("datetime", "timezone"), ("copyreg", "_reconstructor"),
}
_NUMPY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
          ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"),
          ("numpy", "dtype")}
_CLASS_NAME = re.compile(r"_?[A-Z][A-Za-z0-9_]*")


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose globals are data builders, lazy tensors or inert stand-ins."""

    _stubs: dict[str, type] = {}

    def __init__(self, file: Any, storage_source: Any = None, entries: dict[str, tuple[int, int]] | None = None,
                 where: str = "") -> None:
        super().__init__(file)
        self._source, self._entries, self._where = storage_source, entries or {}, where

    def find_class(self, module: str, name: str) -> Any:
        top = module.split(".")[0]
        if (module, name) in _SAFE:
            return super().find_class(module, name)
        if module == "_codecs" and name == "encode":  # bytes in protocol-2 pickles
            return lambda s, enc="latin1": s.encode(enc) if isinstance(s, str) else bytes(s)
        if (module, name) in _NUMPY or (module == "numpy.dtypes" and _CLASS_NAME.fullmatch(name)):
            return super().find_class(module, name)
        if top == "torch":
            if module == "torch._utils" and name == "_rebuild_tensor_v2":
                return _rebuild_tensor
            if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
                return _rebuild_parameter
            if module == "torch._utils" and name == "_rebuild_from_type_v2":  # a tensor subclass: its data
                return lambda func, cls, args, state: func(*args)
            if name.startswith("_rebuild"):  # quantized, sparse, nested, meta ...: not silently a string
                raise pickle.UnpicklingError(f"unsupported tensor encoding {module}.{name}")
            if name in _STORAGE_DTYPES:
                return _StorageType(_STORAGE_DTYPES[name])
            if module == "torch" and name == "Size":
                return tuple
            if not _CLASS_NAME.fullmatch(name) or not re.search("[a-z]", name):  # float32, _get_layout, ...
                return _Ref(f"{module}.{name}")
            return self._stub(module, name)
        if module == "pathlib":  # checkpoint_id may be a Path; keep it as text
            return lambda *parts: os.path.join(*map(str, parts)) if parts else ""
        if top in _DENY_MODULES or module.startswith("__") or not _CLASS_NAME.fullmatch(name):
            raise UnsafePickle(f"{module}.{name}")
        return self._stub(module, name)

    def _stub(self, module: str, name: str) -> type:
        if name == "TensorProperties" and module.startswith("torch.distributed.checkpoint"):
            return _TensorProperties
        if name == "MetadataIndex" and module.startswith("torch.distributed.checkpoint"):
            return _MetadataIndex
        key = f"{module}.{name}"
        if key not in self._stubs:
            base = _DataStub if module.startswith("torch.distributed.checkpoint") and name in _DATA_CLASSES else _Stub
            self._stubs[key] = type(name, (base,), {"__module__": "pytest_miles.ckpt.unpickle.stub"})
        return self._stubs[key]

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:80]}")
        key = str(pid[2])
        if key not in self._entries:
            raise pickle.UnpicklingError(f"storage {key!r} is not in the archive")
        offset, nbytes = self._entries[key]
        return Storage(self._source, offset, nbytes, pid[1].dtype)


def load_pickle(data: bytes, where: str) -> Any:
    """A plain pickle (DCP `.metadata`): CheckpointError naming `where` for anything bad."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), where=where).load()
    except UnsafePickle as exc:
        raise CheckpointError(f"{where}: refused: the pickle calls {exc.name} "
                              "(checkpoint files are never executed)") from None
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{where}: corrupt or truncated pickle ({type(exc).__name__}: {exc})") from None
