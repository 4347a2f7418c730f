"""The rollout x training precision matrix of Miles' low-precision guide, as data.

One place holds the formats (block layout, scale format, maturity), which GPU generations can
run each format, which rollout x training cells are supported, and the two rules Miles'
launcher enforces. `validate_precision_config` applies them; `precision_matrix` turns them into
pytest params (unsupported cells become checks that the configuration is rejected).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pytest_miles.facts.hardware import GPU_CLASSES, Hardware, parse_override


@dataclass(frozen=True)
class Format:
    name: str
    title: str
    block: tuple[int, int] | None
    element: str
    scale: str
    maturity: str
    rollout_flag: str | None
    train_flag: str | None


FORMATS: dict[str, Format] = {
    "bf16": Format("bf16", "BF16", None, "bfloat16", "none", "baseline", None, None),
    "fp8_blockwise": Format("fp8_blockwise", "FP8 block-wise (DeepSeek-style)", (128, 128), "float8_e4m3fn",
                            "FP32 per 128x128 block", "generally available", "--rollout-fp8", "--fp8-recipe blockwise"),
    "mxfp8": Format("mxfp8", "MXFP8", (1, 32), "float8_e4m3fn", "UE8M0 (power of two) per 1x32 block", "beta",
                    "--rollout-mxfp8", "--train-mxfp8"),
    "nvfp4": Format("nvfp4", "NVFP4 (E2M1)", (1, 16), "e2m1",
                    "FP8 E4M3 per 1x16 block + FP32 per tensor", "experimental", None, None),
}

# GPU generation -> formats it runs (the low-precision guide's hardware table). NVFP4 on Blackwell is "in
# development" there, so no GPU runs it yet; Ada (sm_89) and consumer Blackwell are not in the
# table and get BF16 only.
SUPPORT: dict[str, frozenset[str]] = {
    "hopper": frozenset({"bf16", "fp8_blockwise"}),
    "blackwell": frozenset({"bf16", "fp8_blockwise", "mxfp8"}),
    "ampere": frozenset({"bf16"}),
    "blackwell_consumer": frozenset({"bf16"}),
    "amd": frozenset({"bf16"}),
    "none": frozenset({"bf16"}),
}
NEEDS = {
    "fp8_blockwise": "hopper (H100/H200) or blackwell (B200/B300/GB200/GB300)",
    "mxfp8": "blackwell (B200/B300/GB200/GB300)",
    "nvfp4": "a GPU with the NVFP4 recipe, which is still in development on blackwell",
}

# (rollout, train) -> how the Miles low-precision guide describes the cell. Absent cells are not supported.
COMPATIBILITY: dict[tuple[str, str], str] = {
    ("bf16", "bf16"): "supported: baseline",
    ("fp8_blockwise", "fp8_blockwise"): "supported: unified block-wise FP8 (Hopper + Blackwell)",
    ("fp8_blockwise", "bf16"): "supported: BF16 train + FP8 inference (expect drift; pair with TIS/R3 on MoE)",
    ("mxfp8", "mxfp8"): "supported: unified MXFP8 (Blackwell)",
}
COMING = {("nvfp4", "nvfp4"): "coming soon: the unified NVFP4 recipe is in development"}
RULE_EXCLUSIVE = "--rollout-fp8 and --rollout-mxfp8 are mutually exclusive"
RULE_MXFP8 = "--train-mxfp8 requires --rollout-mxfp8 (no MXFP8-train + FP8-rollout combination)"


@dataclass(frozen=True)
class PrecisionCell:
    """One (rollout format, train format) cell of the low-precision guide's table: valid or not, and why.
    (Named apart from capabilities.Cell, a row of the SGLang capability data.)"""

    rollout: str
    train: str
    valid: bool
    status: str

    @property
    def id(self) -> str:
        return f"rollout={self.rollout}-train={self.train}"

    @property
    def unified(self) -> bool:
        return self.rollout == self.train

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.rollout, self.train)))

    def assert_rejected(self) -> None:
        """An invalid cell as a check: `validate_precision_config` must reject it with its rule."""
        __tracebackhide__ = True
        try:
            validate_precision_config(self.rollout, self.train)
        except ValueError as exc:
            if str(exc) != self.status:
                raise AssertionError(f"{self.id}: rejected with {str(exc)!r}, expected {self.status!r}") from None
            return
        raise AssertionError(f"{self.id}: accepted, but the compatibility table says: {self.status}")


Cell = PrecisionCell  # the earlier name, still importable


def _check_name(name: Any, what: str) -> str:
    if name not in FORMATS:
        raise ValueError(f"{what}: unknown precision format {name!r}; known: {', '.join(FORMATS)}")
    return name


def gpu_generation(hw: Hardware) -> tuple[str, str]:
    """(generation key of SUPPORT, description) of the first GPU, or ('none', ...)."""
    if not hw.gpus:
        return "none", "no NVIDIA GPU"
    g = hw.gpus[0]
    if g.vendor != "nvidia":
        return "amd", hw.describe()
    return (g.gpu_class or "none"), hw.describe()


def _hardware(gpu: str | Hardware | None) -> Hardware | None:
    if gpu is None or isinstance(gpu, Hardware):
        return gpu
    return parse_override(gpu)


def unsupported_on(formats: Iterable[str], hw: Hardware) -> str | None:
    """The skip reason when `hw` cannot run one of `formats`, else None."""
    gen, found = gpu_generation(hw)
    for f in formats:
        if f not in SUPPORT.get(gen, frozenset({"bf16"})):
            return f"{f} needs {NEEDS[f]}; found {found}"
    return None


def cell_status(rollout: str, train: str) -> PrecisionCell:
    """The cell as the low-precision guide's table and rules describe it (no hardware involved)."""
    if train == "mxfp8" and rollout != "mxfp8":
        return PrecisionCell(rollout, train, False, RULE_MXFP8)
    if (rollout, train) in COMPATIBILITY:
        return PrecisionCell(rollout, train, True, COMPATIBILITY[(rollout, train)])
    if (rollout, train) in COMING:
        return PrecisionCell(rollout, train, False, COMING[(rollout, train)])
    return PrecisionCell(rollout, train, False, f"not a supported combination: rollout {rollout} x train {train} "
                                       "is not in the compatibility table")


def validate_precision_config(rollout: str | Iterable[str], train: str,
                              gpu: str | Hardware | None = None) -> PrecisionCell:
    """Raise ValueError naming the violated rule or the missing hardware support; else the cell.

    `rollout` may be one format or the set of rollout formats a launcher was given
    (`["fp8_blockwise", "mxfp8"]` for `--rollout-fp8 --rollout-mxfp8`)."""
    if not isinstance(rollout, str) and not isinstance(rollout, (list, tuple, set, frozenset)):
        raise ValueError(f"rollout: {rollout!r} is not a precision format name or a list of them; known: "
                         f"{', '.join(FORMATS)}")
    names = [rollout] if isinstance(rollout, str) else list(rollout)
    if not names:
        raise ValueError("rollout: no precision format given")
    for n in names:
        _check_name(n, "rollout")
    _check_name(train, "train")
    if {"fp8_blockwise", "mxfp8"} <= set(names):
        raise ValueError(RULE_EXCLUSIVE)
    if len(set(names)) > 1:
        raise ValueError(f"rollout: one precision format per rollout, got {', '.join(names)}")
    cell = cell_status(names[0], train)
    if not cell.valid:
        raise ValueError(cell.status)
    hw = _hardware(gpu)
    if hw is not None:
        reason = unsupported_on(cell.formats, hw)
        if reason:
            raise ValueError(reason)
    return cell


def precision_matrix(gpu: str | Hardware | None = None) -> list:
    """pytest.params for every rollout x train cell, id `rollout=X-train=Y`.

    Each carries `@pytest.mark.miles_precision(rollout, train)`: the plugin skips cells this
    machine's GPU cannot run (with the format and the GPU in the reason). With `gpu` given,
    that decision is made here instead. Invalid cells have `cell.valid == False`: test that
    `validate_precision_config` rejects them with `cell.status`."""
    import pytest

    hw = _hardware(gpu)
    params = []
    for r in FORMATS:
        for t in FORMATS:
            cell = cell_status(r, t)
            marks = [pytest.mark.miles_precision(rollout=r, train=t)]
            if hw is not None and cell.valid:
                reason = unsupported_on(cell.formats, hw)
                if reason:
                    marks.append(pytest.mark.skip(reason=reason))
            # An invalid cell is a check that the combination is refused: its id says so.
            params.append(pytest.param(cell, id=cell.id if cell.valid else f"{cell.id}-rejected", marks=marks))
    return params


def render_matrix(hw: Hardware) -> str:
    """The compatibility table, with what this GPU can run marked."""
    gen, found = gpu_generation(hw)
    names = list(FORMATS)
    width = max(len(n) for n in names) + 2
    lines = [f"precision matrix for {found} (generation: {gen})",
             "rollout \\ train".ljust(16) + "".join(n.ljust(width) for n in names)]
    for r in names:
        row = r.ljust(16)
        for t in names:
            c = cell_status(r, t)
            mark = "-" if not c.valid else ("RUNS" if unsupported_on(c.formats, hw) is None else "no hw")
            row += mark.ljust(width)
        lines.append(row)
    lines.append("")
    lines.append("formats:")
    for f in FORMATS.values():
        block = "x".join(map(str, f.block)) if f.block else "-"
        runs = "yes" if f.name in SUPPORT.get(gen, frozenset()) else "no"
        lines.append(f"  {f.name:14} block {block:8} scales {f.scale:42} {f.maturity:20} runs here: {runs}")
    lines.append("rules: " + RULE_EXCLUSIVE + "; " + RULE_MXFP8)
    lines.append("RUNS = supported and this GPU runs it; no hw = supported, not on this GPU; - = not supported")
    return "\n".join(lines)


assert set(SUPPORT) - {"amd", "none"} <= set(GPU_CLASSES)
