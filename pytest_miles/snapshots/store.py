"""Determinism snapshots: exact digests of what a deterministic run produced, recorded per test
and per configuration (the fingerprint fields that decide bitwise results), compared on the
next run or on another machine, with a diagnosis when the configuration differs.

Files: `<snapshot dir>/<test module path>.json`, one per test module. Every write takes a file
lock and replaces the file atomically, so pytest-xdist workers never lose or tear a record. A
run never deletes a record; records no test touched are listed, not deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_miles.errors import SnapshotError  # noqa: F401  (importable here too)
from pytest_miles.facts import troubleshooting

FORMAT = "pytest-miles/snapshots/1"

# The likely cause of each differing field comes from the one troubleshooting table (facts/troubleshooting.toml).
LABELS = {"cudnn": "cuDNN", "nccl": "NCCL", "cuda_runtime": "CUDA", "driver": "driver", "gpu_name": "GPU",
          "gpu_capability": "GPU capability", "gpu_count": "GPU count", "cpu": "CPU"}


# ---- values --------------------------------------------------------------------------------


def canonical(value: Any) -> tuple[str, Any]:
    """(kind, JSON-able exact form): floats by their bits, tensors by dtype, shape and bytes."""
    torch = __import__("sys").modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return "tensor", {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": hashlib.sha256(raw).hexdigest()}
    if isinstance(value, float):
        return "float", value.hex()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes", bytes(value).hex()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return type(value).__name__, value
    if isinstance(value, dict):
        if len({str(k) for k in value}) != len(value):  # {1: a, "1": b} would collide in JSON
            raise SnapshotError("cannot snapshot a dict whose keys collide as strings (e.g. 1 and '1')")
        return "dict", {str(k): canonical(v)[1] for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, float) for v in value):
            return "floats", [v.hex() for v in value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return "ints", list(value)
        return "list", [canonical(v)[1] for v in value]
    raise SnapshotError(f"cannot snapshot a {type(value).__name__}: use numbers, bytes, lists, dicts, strings or "
                        "tensors")


def digest_of(form: Any) -> str:
    return hashlib.sha256(json.dumps(form, sort_keys=True).encode()).hexdigest()


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two canonical forms first differ, e.g. `[17]: 0x1.8p-3 vs 0x1.8000002p-3`."""
    if type(a) is not type(b):
        return f"{path or 'value'}: {a!r:.60} vs {b!r:.60}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k}: only in {'the record' if k in a else 'this run'}"
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        return None
    if a != b:
        if isinstance(a, str) and a.startswith(("0x", "-0x")) and isinstance(b, str):
            return f"{path}: {float.fromhex(a)!r} ({a}) vs {float.fromhex(b)!r} ({b})"
        return f"{path or 'value'}: {a!r:.80} vs {b!r:.80}"
    return None


# ---- configurations ------------------------------------------------------------------------


# Packages whose version decides bits. Not ray: it places processes, it computes nothing.
KEY_PACKAGES = ("torch", "sglang", "sglang-kernel", "sgl-kernel", "flashinfer-python", "megatron-core",
                "transformer-engine", "triton")


def cpu_key(cpu: str | None) -> str | None:
    """The part of a CPU description that decides the bits of a CPU run: the vendor (MKL takes other
    code paths on AMD than on Intel), the vector level ATen dispatches its kernels on (default /
    avx2 / avx512: the vector width sets the reduction order) and the bf16 matmul unit oneDNN uses
    (amx_tile, avx512_bf16). Not the model name or stepping, not other ISA flags: the same
    dispatch runs the same kernels."""
    if not cpu:
        return None
    name, _, flags = cpu.partition(" [")
    flags_set = set(flags.rstrip("]").split())
    vendor = "Intel" if "Intel" in name else "AMD" if "AMD" in name else name.split(" ")[0] or "unknown"
    level = "avx512" if "avx512f" in flags_set else "avx2" if "avx2" in flags_set else "default"
    bf16 = "amx" if "amx_tile" in flags_set else "avx512_bf16" if "avx512_bf16" in flags_set else "no bf16 unit"
    return f"{vendor} {level}, {bf16}"


def configuration(fingerprint: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Flat dict of the fields that decide bitwise results, and nothing else (not Ray's presence,
    not the CPU on GPU runs, not ISA flags the kernels do not dispatch on)."""
    flat: dict[str, Any] = {}
    for key in ("gpu_name", "gpu_capability", "gpu_count", "driver", "cuda_runtime", "cudnn", "nccl"):
        flat[key] = fingerprint.get(key)
    packages = fingerprint.get("packages") or {}
    for k in KEY_PACKAGES:
        flat[f"packages.{k}"] = packages.get(k)
    for k, v in (fingerprint.get("env") or {}).items():
        flat[f"env.{k}"] = v
    if not fingerprint.get("gpu_name") and fingerprint.get("cpu"):  # CPU runs: the CPU decides the bits
        flat["cpu"] = cpu_key(fingerprint["cpu"])
    for k, v in config.items():
        flat[f"config.{k}"] = v
    return flat


def config_digest(conf: dict[str, Any]) -> str:
    return digest_of(conf)[:16]


def diagnose(recorded: dict[str, Any], current: dict[str, Any], key_fields_only: bool = False) -> list[str]:
    """`cuDNN 9.19.0 -> 9.10.0 (likely cause: ...)` for every field that differs. With
    `key_fields_only`, fields an older record keeps but today's key leaves out (packages.ray)
    are not differences."""
    out = []
    keys = set(current) if key_fields_only else set(recorded) | set(current)
    for key in sorted(keys):
        a, b = recorded.get(key), current.get(key)
        if a != b:
            label = LABELS.get(key, key)
            cause = troubleshooting.for_fingerprint(key).explained()
            out.append(f"{label} {a} -> {b} ({cause})")
    return out


# ---- the store -----------------------------------------------------------------------------


@dataclass
class Outcome:
    status: str  # recorded | passed | passed (other configuration) | failed | different configuration | missing
    message: str


def _stale_temporaries(path: Path) -> list[Path]:
    return list(path.parent.glob(f"{glob_escape(path.name)}*.tmp"))


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


class _CleanLock:
    """The file's lock; once held, temporaries a killed writer left beside the file are removed
    (writers create them only while holding this lock, so none of them is in use)."""

    def __init__(self, lock_path: str, path: Path) -> None:
        from filelock import FileLock

        self._lock, self._path = FileLock(lock_path, timeout=60), path

    def __enter__(self):
        self._lock.acquire()
        for tmp in _stale_temporaries(self._path):
            tmp.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _json_type(value: Any) -> str:
    """What a value parsed from JSON was, in JSON's words (for messages about a file)."""
    if value is None:
        return "null (or missing)"
    names = {bool: "a boolean", dict: "an object", list: "an array", str: "a string", int: "a number",
             float: "a number"}
    return names.get(type(value), type(value).__name__)


class SnapshotStore:
    def __init__(self, root: str | Path, update: bool = False, regen_all: bool = False) -> None:
        self.root = Path(root)
        self.update, self.regen_all = update, regen_all

    def path_for(self, module: str) -> Path:
        rel = re.sub(r"\.py$", "", module).replace("::", "/")
        return self.root / f"{rel}.json"

    def _lock(self, path: Path):

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SnapshotError(f"snapshot dir {path.parent}: cannot be created ({exc.strerror or exc})") from None
        if not os.access(path.parent, os.W_OK):
            raise SnapshotError(f"snapshot dir {path.parent}: not writable (needed to record; comparing works "
                                "read-only)")
        return _CleanLock(str(path) + ".lock", path)

    def read(self, path: Path) -> dict[str, Any]:
        if not path.exists():
            return {"format": FORMAT, "configurations": {}}
        from pytest_miles._files import load_json
        from pytest_miles.errors import InputError

        try:
            data = load_json(path, "snapshot file (JSON written by pytest-miles)", limit=256 * 2**20)
        except InputError as exc:
            raise SnapshotError(f"{path}: corrupt snapshot file ({exc})") from None
        if (not isinstance(data, dict) or data.get("format") != FORMAT
                or not isinstance(data.get("configurations"), dict)):
            raise SnapshotError(f"{path}: not a pytest-miles snapshot file (format {FORMAT} expected)")
        for key, conf in data["configurations"].items():
            if not isinstance(conf, dict):
                raise SnapshotError(f"{path}: configuration {key} is {_json_type(conf)}, expected an object with "
                                    "'fingerprint' and 'records'")
            for name, holds in (("fingerprint", "field -> value"), ("records", "record name -> record")):
                if not isinstance(conf.get(name), dict):
                    raise SnapshotError(f"{path}: configuration {key}: '{name}' is {_json_type(conf.get(name))}, "
                                        f"expected an object of {holds}")
            if config_digest(conf["fingerprint"]) != key:
                raise SnapshotError(f"{path}: configuration {key} was edited by hand (its fingerprint no longer "
                                    "matches its key); regenerate with --miles-snapshot-regen-all")
            for rid, rec in conf["records"].items():
                if not isinstance(rec, dict) or not isinstance(rec.get("digest"), str) \
                        or not re.fullmatch(r"[0-9a-f]{64}", rec["digest"]):
                    raise SnapshotError(f"{path}: record {rid!r} is malformed (expected an object with a 'digest' "
                                        "of 64 hex digits, a 'kind' and a 'value')")
                if rec.get("value") is not None and digest_of(rec["value"]) != rec["digest"]:
                    raise SnapshotError(f"{path}: record {rid!r} was edited by hand (its value no longer matches "
                                        "its digest)")
        return data

    def _write(self, path: Path, data: dict[str, Any]) -> None:
        from pytest_miles._files import atomic_write

        atomic_write(path, json.dumps(data, indent=1, sort_keys=True))

    def check(self, module: str, record_id: str, value: Any, conf: dict[str, Any],
              keep_value_limit: int = 4096) -> Outcome:
        kind, form = canonical(value)
        digest = digest_of(form)
        key = config_digest(conf)
        path = self.path_for(module)
        small = len(json.dumps(form)) <= keep_value_limit * 24
        # Only a run that may write takes the lock: comparing reads a file that writers replace
        # atomically, so it works on a read-only folder (a checkout, a mounted artifact).
        with self._lock(path) if (self.update or self.regen_all) else contextlib.nullcontext():
            data = self.read(path)
            confs = data["configurations"]
            mine = confs.get(key)
            rec = (mine or {}).get("records", {}).get(record_id)
            if rec is not None and rec["digest"] == digest and not self.regen_all:
                return Outcome("passed", f"{record_id}: digest {digest[:16]} matches the record")
            if rec is None and not (self.update or self.regen_all):
                others = [(len(diagnose(c["fingerprint"], conf)), k, c) for k, c in confs.items()
                          if record_id in c.get("records", {})]
                if others:
                    others = [(len(diagnose(c["fingerprint"], conf, key_fields_only=True)), k, c) for _, k, c in others]
                    return self._other_configuration(path, record_id, form, digest, conf, others)
                return Outcome("missing", f"{record_id}: no record in {path}; run with --miles-snapshot-update "
                                          "to write it")
            if rec is not None and rec["digest"] != digest and not (self.update or self.regen_all):
                where = first_difference(rec["value"], form) if rec.get("value") is not None else \
                    "raw values were not recorded (too large); only digests are compared"
                return Outcome("failed", f"{record_id} in {path} [configuration {key}]: digest {rec['digest'][:16]} "
                                         f"(record) vs {digest[:16]} (this run); first difference {where}")
            mine = confs.setdefault(key, {"fingerprint": conf, "records": {}})
            mine["records"][record_id] = {"kind": kind, "digest": digest, "value": form if small else None}
            self._write(path, data)
            return Outcome("recorded", f"{record_id}: recorded digest {digest[:16]} in {path}")

    def _other_configuration(self, path: Path, record_id: str, form: Any, digest: str, conf: dict[str, Any],
                             others: list) -> Outcome:
        """No record for this configuration, one for another: compare it anyway. Equal values pass
        (with a note naming the other configuration); different ones are reported with each
        differing field and its likely cause (the caller skips or fails, by option)."""
        same = [o for o in others if o[2]["records"][record_id]["digest"] == digest]
        _, key, c = min(same or others, key=lambda o: o[0])
        rec = c["records"][record_id]
        fields = "; ".join(diagnose(c["fingerprint"], conf, key_fields_only=True)) or "no field differs"
        if same:
            return Outcome("passed (other configuration)",
                           f"{record_id}: equal to the record of another configuration ({key}: {fields}); "
                           f"digest {digest[:16]}")
        where = first_difference(rec["value"], form) if rec.get("value") is not None else "not recorded (too large)"
        return Outcome("different configuration",
                       f"{record_id} in {path}: only another configuration ({key}) has a record, and this run's "
                       f"value differs from it (record {rec['digest'][:16]} vs this run {digest[:16]}; first "
                       f"difference {where}). Differing fields: {fields}")

    def all_records(self) -> set[tuple[str, str]]:
        """(file, record id) of every record under the root, for the unused-records listing."""
        out = set()
        if not self.root.exists():
            return out
        for p in self.root.rglob("*.json"):
            try:
                data = self.read(p)
            except SnapshotError:
                continue
            for conf in data["configurations"].values():
                out |= {(str(p), rid) for rid in conf.get("records", {})}
        return out
