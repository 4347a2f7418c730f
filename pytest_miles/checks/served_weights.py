"""The served weights are the trainer's: each tensor read back from the engine through SGLang's
`/get_weights_by_name` (or the offline `sglang.Engine.get_weights_by_name`) and compared bitwise
with the expected weights: an HF state dict, an HF checkpoint directory, or a megatron-core state
dict plus its config (converted with `pytest_miles.models.convert.megatron_to_hf`).

Miles' `--check-weight-update-equal` answers the same question another way: SGLang snapshots its
weights as loaded from `--hf-checkpoint`, poisons them (`reset_tensors`), the trainer pushes its
weights, and SGLang compares against the snapshot inside the engine (python/sglang/srt/utils/
weight_checker.py, `WeightChecker`, driven by `check_weights(action="snapshot"|"reset_tensors"|
"compare")` in Miles' train.py). That needs the trainer's update path; this check needs only the
engine's read endpoint, so it also runs on the embedded engines and after any weight update.

Why the JSON round trip is exact: SGLang answers `weight.cpu().to(torch.float32).numpy().tolist()`
(engines/weights_by_name.py cites the sources). Every bf16, fp16 and float8 value is a float32
value; `tolist()` widens float32 to a Python float (float64) exactly; orjson (SGLang) and
`json.dumps` (the reference server) write the shortest repr that reads back to the same float64;
so the float32 we rebuild is the served float32, bit for bit (checked: a value that is not a
float32 is reported as a broken answer, not compared). Comparison is therefore done on float32
bits of both sides: served and expected are equal there exactly when equal in the served dtype.
Non-finite values come back as `null` (JSON has no NaN): a null matches a non-finite expected
value only (NaN and inf cannot be told apart; the report says so when it happened).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Tensors of a quantized checkpoint that are not read back: SGLang maps q/k/v and gate/up scale
# names onto the fused parameter and narrows them with the WEIGHT's row offsets (models/llama.py),
# which is not where a block scale's rows are; o_proj/down_proj scales can be named explicitly.
SCALE_SUFFIXES = ("_scale_inv", ".weight_scale", ".input_scale")
MEGATRON_KEYS = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight")


@dataclass
class ServedWeightsReport:
    engine: str
    source: str
    tensors: int = 0
    elements: int = 0
    partial: list[tuple[str, int, int]] = field(default_factory=list)  # (name, rows read, rows held)
    not_compared: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    replicas: int = 1
    nulls: int = 0  # non-finite values matched by position only (JSON null)

    def render(self) -> str:
        return "; ".join([f"served weights equal bitwise: {self.tensors} tensors, {self.elements} elements read from "
                          f"{self.engine} and compared on float32 bits with {self.source}", *self.notes()])

    def notes(self) -> list[str]:
        out = []
        if self.replicas > 1:
            out.append(f"every one of {self.replicas} data-parallel replicas answered, each compared")
        if self.partial:
            n, m = sum(p[1] for p in self.partial), sum(p[2] for p in self.partial)
            out.append(f"truncated: only the first rows were read for {len(self.partial)} tensor(s) ({n} rows of "
                       f"{m}), e.g. {self.partial[0][0]} {self.partial[0][1]} of {self.partial[0][2]} rows")
        if self.nulls:
            out.append(f"{self.nulls} non-finite value(s) came back as JSON null and matched non-finite expected "
                       "values by position (NaN and inf cannot be told apart)")
        if self.not_compared:
            out.append(f"not compared ({len(self.not_compared)}): {self.not_compared[0][0]}: {self.not_compared[0][1]}"
                       + (f" and {len(self.not_compared) - 1} more" if len(self.not_compared) > 1 else ""))
        return out


def assert_served_weights_equal(engine: Any, expected: Any, *, names: Iterable[str] | None = None,
                                truncate_size: int | None = None, config: Any = None,
                                spec: str = "local") -> ServedWeightsReport:
    """Read every expected tensor back from `engine` and compare bitwise; AssertionError naming
    the first differing tensor, index and both values (hex bits) and how much was compared.

    `expected`: {HF name: torch.Tensor}; an HF checkpoint directory (its *.safetensors, read
    without executing anything; an FP8 checkpoint is compared as written: the served weights are
    the quantized ones); or {megatron name: tensor} with `config` (HF config.json dict, TinyConfig
    or QwenShape) and `spec` ("local" | "te"), converted with the project's converter.
    `names`: the tensors to read (default: every expected tensor but quantization scales).
    `truncate_size`: SGLang's, rows per tensor (default: every row, so the whole tensor is read)."""
    read = getattr(engine, "get_weights_by_name", None)
    label = getattr(engine, "name", type(engine).__name__)
    if not callable(read):
        raise TypeError(f"engine {label!r} ({type(engine).__name__}) has no get_weights_by_name: SGLang's "
                        "/get_weights_by_name (SGLangEngine, ReferenceServerEngine) or sglang.Engine's "
                        "(SGLangOfflineEngine, ReferenceEngine) is what this check reads")
    if truncate_size is not None and (isinstance(truncate_size, bool) or not isinstance(truncate_size, int)
                                      or truncate_size < 1):
        raise ValueError(f"truncate_size {truncate_size!r}: expected a positive integer (rows per tensor) or None "
                         "(every row)")
    weights, source, quantized = _expected(expected, config, spec)
    report = ServedWeightsReport(label, source)
    selected = _names(names, weights, quantized, report)
    report.replicas = _replicas(engine)

    import torch

    from pytest_miles.engines.base import WeightNotServed

    mismatches: list[str] = []
    for name in selected:
        want = weights[name]
        if want.dim() == 0:
            report.not_compared.append((name, "a 0-d tensor (SGLang's slicing answers 'failed' for it)"))
            continue
        rows = want.shape[0]
        ask = rows if truncate_size is None else truncate_size
        try:
            got = read(name, ask)
        except WeightNotServed as exc:
            raise AssertionError(
                f"served weights: {label} serves no weight named {name!r}, which {source} holds ({exc}). SGLang "
                "answers this for a name its model does not have and for every name of a model class without "
                "get_weights_by_name (sgl-project/sglang#5066, Qwen2); compared before it: "
                f"{report.tensors} tensors, {report.elements} elements") from exc
        want = want[:ask].detach().cpu()
        if ask < rows:
            report.partial.append((name, ask, rows))
        answers = got if report.replicas > 1 else [got]
        if report.replicas > 1 and (not isinstance(got, list) or len(got) != report.replicas):
            raise AssertionError(f"served weights: {label} runs dp_size {report.replicas} but answered "
                                 f"{len(got) if isinstance(got, list) else type(got).__name__} value(s) for {name!r}")
        want32 = want.to(torch.float32)  # once per tensor, whatever the number of replicas
        want_bits, want_nonfinite = _bits(want32), ~torch.isfinite(want32)
        for replica, answer in enumerate(answers):
            served, nulls = _served_tensor(answer, want.shape, name, label)
            matched_nulls = nulls & want_nonfinite
            diff = (_bits(served) != want_bits) & ~matched_nulls
            report.nulls += int(matched_nulls.sum())
            if bool(diff.any()):
                where = f" (data-parallel replica {replica})" if report.replicas > 1 else ""
                mismatches.append(_describe(name + where, diff, served, want, nulls))
        report.tensors += 1
        report.elements += want.numel()
    if mismatches:
        raise AssertionError(
            f"served weights differ from {source}: {len(mismatches)} of {report.tensors} tensors "
            f"({report.elements} elements read from {label}); first: {mismatches[0]}"
            + ("" if len(mismatches) == 1 else "; also " + ", ".join(m.split(" at index")[0] for m in mismatches[1:6]))
            + "".join(f"; {note}" for note in report.notes()))
    if not report.tensors:
        raise AssertionError(f"served weights: nothing compared ({report.render()})")
    return report


# -- expected weights ------------------------------------------------------------------------


def _expected(expected: Any, config: Any, spec: str) -> tuple[dict, str, bool]:
    """-> ({HF name: tensor}, what they are, whether a quantized checkpoint)."""
    import torch

    if isinstance(expected, (str, os.PathLike)):
        return _read_hf_dir(Path(expected))
    if not isinstance(expected, Mapping):
        raise TypeError(f"expected: {type(expected).__name__}; pass an HF state dict ({{name: torch.Tensor}}), an HF "
                        "checkpoint directory, or a megatron-core state dict with config=")
    for k, v in expected.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise TypeError(f"expected[{k!r}]: {type(v).__name__}; every entry must be a str name -> torch.Tensor")
    if not expected:
        raise ValueError("expected: an empty state dict, nothing to compare")
    if any(k in expected for k in MEGATRON_KEYS) or any(k.startswith("decoder.layers.") for k in expected):
        if config is None:
            raise ValueError("expected: megatron-core names (decoder.layers...) need config= (the HF config.json "
                             "dict, a TinyConfig or a QwenShape) to be converted to the HF names the engine serves")
        from pytest_miles.models.convert import megatron_to_hf

        weights = megatron_to_hf(dict(expected), config, spec)
        return weights, f"the megatron-core state dict ({spec} spec, converted to HF names)", False
    if config is not None:
        raise ValueError("config= is for a megatron-core state dict; expected holds HF names already")
    return dict(expected), "the expected HF state dict", False


def _read_hf_dir(path: Path) -> tuple[dict, str, bool]:
    """Its *.safetensors (header and raw tensors only: nothing in them is executed)."""
    from pytest_miles.models.embedded import load_safetensors_dir, read_hf_config

    if not path.is_dir():
        raise ValueError(f"expected: {path} is not a directory (an HF checkpoint directory is expected)")
    try:
        cfg = read_hf_config(path)
    except FileNotFoundError as exc:
        raise ValueError(f"expected: {exc} (an HF checkpoint directory has a config.json)") from None
    except ValueError as exc:
        raise ValueError(f"expected: {exc}") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        raise ValueError(f"expected: {path} has no *.safetensors" + (
            f" ({', '.join(pickles[:3])} are pickles: never unpickled here; convert them to safetensors)"
            if pickles else ""))
    try:
        weights = load_safetensors_dir(path)
    except ValueError as exc:
        raise ValueError(f"expected: {exc}") from None
    qc = cfg.get("quantization_config")
    if qc:
        return weights, (f"the {qc.get('quant_method', 'quantized')} checkpoint {path} as written (the served "
                         "weights are the quantized ones)"), True
    return weights, f"the checkpoint {path}", False


def _names(names: Iterable[str] | None, weights: dict, quantized: bool, report: ServedWeightsReport) -> list[str]:
    if names is None:
        out = []
        for k in sorted(weights):
            if k.endswith(SCALE_SUFFIXES):
                report.not_compared.append((k, "a quantization scale: SGLang narrows fused scales with the weight's "
                                               "row offsets, so only its quantized weight is compared"))
            else:
                out.append(k)
        return out
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"names: {names!r}; expected a list of tensor names (str)")
    names = list(names)
    missing = [n for n in names if n not in weights]
    if missing:
        raise ValueError(f"names: {missing[0]!r} is not in the expected weights ({len(weights)} tensors, e.g. "
                         f"{', '.join(sorted(weights)[:3])})")
    return names


def _replicas(engine: Any) -> int:
    """SGLang's dp_size (one answer per replica); refuses tp_size > 1 (column-parallel tensors
    would answer one rank's shard only)."""
    info_fn = getattr(engine, "server_info", None)
    info = info_fn() if callable(info_fn) else {}
    tp, dp = int(info.get("tp_size") or 1), int(info.get("dp_size") or 1)
    if tp > 1:
        raise ValueError(f"engine {getattr(engine, 'name', '?')}: tp_size {tp}; SGLang's get_weights_by_name answers "
                         "this rank's shard of column-parallel tensors (q/k/v, gate/up, embeddings) and gathers only "
                         "o_proj/down_proj: read the served weights from an engine with tp_size 1")
    return dp


# -- comparison ------------------------------------------------------------------------------


def _served_tensor(answer: Any, shape, name: str, label: str):
    """-> (float32 tensor, mask of JSON nulls). AssertionError for a wrong shape; EngineError for
    an answer that is not float32 values (not what SGLang writes)."""
    import torch

    from pytest_miles.engines.base import EngineError

    def nulls_to_nan(v):
        if isinstance(v, list):
            return [nulls_to_nan(x) for x in v]
        return float("nan") if v is None else v

    try:
        t64 = torch.tensor(answer, dtype=torch.float64)
        nulls = torch.zeros(t64.shape, dtype=torch.bool)
    except (TypeError, ValueError, RuntimeError):
        try:
            t64 = torch.tensor(nulls_to_nan(answer), dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise EngineError(f"{label} get_weights_by_name {name!r}: the answer is not a (nested) list of numbers "
                              f"({exc})") from None
        nulls = torch.isnan(t64)
    if tuple(t64.shape) != tuple(shape):
        raise AssertionError(f"served weights: {name!r} came back with shape {list(t64.shape)} from {label}, "
                             f"expected {list(shape)}")
    t32 = t64.to(torch.float32)
    off = (t32.to(torch.float64) != t64) & ~torch.isnan(t64)
    if bool(off.any()):
        i = _index(int(off.flatten().nonzero()[0]), t64.shape)
        raise EngineError(f"{label} get_weights_by_name {name!r}: value {float(t64[i])!r} at {i} is not a float32 "
                          "(SGLang answers float32 values); not comparable bitwise")
    return t32, nulls


def _bits(t):
    import torch

    return t.contiguous().view(torch.int32)


def _index(flat: int, shape) -> tuple[int, ...]:
    out = []
    for n in reversed(tuple(shape)):
        out.append(flat % n)
        flat //= n
    return tuple(reversed(out))


def _describe(name: str, diff, served, want, nulls) -> str:
    import torch

    flat = diff.flatten().nonzero()
    i = _index(int(flat[0]), diff.shape)
    s = "null (non-finite)" if bool(nulls[i]) else (f"{float(served[i])!r} (float32 bits "
                                                      f"0x{int(served[i].view(torch.int32)) & 0xFFFFFFFF:08x})")
    w = want[i]
    nbits = w.element_size() * 8
    ints = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}[nbits]
    wbits = int(w.reshape(1).view(ints)[0]) & ((1 << nbits) - 1)
    dtype = str(w.dtype).replace("torch.", "")
    return (f"{name} at index {list(i)}: served {s}, expected {float(w.to(torch.float32))!r} ({dtype} bits "
            f"0x{wbits:0{nbits // 4}x}); {len(flat)} of {diff.numel()} elements of this tensor differ")
