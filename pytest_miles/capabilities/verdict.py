"""From a check's report and the capability rule to an outcome that works in pytest AND in plain
scripts: a promised cell that fails raises AssertionError; a known limitation that fails raises
KnownLimitation (pytest reports it as XFAIL naming the reference); a known limitation that passes
under the shape that reproduces it raises UnexpectedPass (an AssertionError: "XPASS(strict)"), and
elsewhere is reported as XPASS; a check that cannot test anything here raises NotApplicable (a
skip in pytest). Scripts catch these exceptions by class; pytest needs no marker.
"""

from __future__ import annotations

import os
from typing import Any

from pytest_miles.capabilities import SGLANG_KINDS, Capabilities, Capability, load_capabilities
from pytest_miles.errors import KnownLimitation, NotApplicable, UnexpectedPass  # noqa: F401  (importable here too)

_PENDING_XPASS: dict[str, str] = {}  # nodeid -> reason, for a non-strict unexpected pass inside pytest


def current_nodeid() -> str | None:
    """The running pytest test, if any (pytest sets PYTEST_CURRENT_TEST while a test runs)."""
    cur = os.environ.get("PYTEST_CURRENT_TEST")
    return cur.rsplit(" ", 1)[0] if cur else None


def capability_for(engine: Any, mode: str, shape: dict[str, Any], settings: dict[str, Any],
                   capabilities: Capabilities | None = None) -> Capability:
    """The rule for this engine: SGLang in deterministic mode consults the data; every other
    engine (the embedded reference, SGLang with the flag off) is held to a hard check."""
    name = getattr(engine, "name", type(engine).__name__).split("@")[0]  # "sglang@ray": a Ray actor
    deterministic = settings.get("enable_deterministic_inference", getattr(engine, "deterministic", True))
    if name not in SGLANG_KINDS or not deterministic:
        return Capability("promised", None, True, name)
    if capabilities is None:
        from pytest_miles.config.resolve import resolve
        from pytest_miles.recording import setting

        capabilities = load_capabilities(setting("capabilities", None) or resolve(None, "capabilities"))
    backend = settings.get("attention_backend") or getattr(engine, "attention_backend", "?")
    version = settings.get("version")
    if version is None:
        from pytest_miles.capabilities import installed_sglang_version

        version = installed_sglang_version()
    return capabilities.lookup(str(backend), mode, version, shape, engine=name)


def judge(report: Any, capability: Capability) -> Any:
    """Turn a report into its outcome (see the module docstring); returns the report when it counts
    as a pass (or a non-strict XPASS)."""
    if capability.status == "not_applicable":
        raise NotApplicable(f"not applicable: {capability.describe()}")
    if not capability.known:
        if not report.passed:
            raise AssertionError(report.render() + f"\n  capability: {capability.describe()}")
        return report
    if not report.passed:
        raise KnownLimitation(report, capability)
    msg = (f"XPASS{'(strict)' if capability.strict else ''}: [{report.mode}] passed although the capability data "
           f"lists a known limitation: {capability.describe()}")
    if capability.strict:
        raise UnexpectedPass(msg + "\n  this shape reproduced it before: if upstream fixed it, narrow the cell's "
                             f"'versions' (cell {capability.cell.id!r} in {capability.cell.source})\n{report.render()}")
    report.notes.append(msg + " (this shape does not always reproduce it)")
    node = current_nodeid()
    if node is not None:
        _PENDING_XPASS[node] = msg
    return report


def adjust_report(item: Any, call: Any, rep: Any) -> None:
    """pytest_runtest_makereport: KnownLimitation -> XFAIL, NotApplicable -> SKIP, a non-strict
    unexpected pass -> XPASS. (Called by the plugin's hook wrapper.)"""
    if call.when != "call":
        return
    exc = call.excinfo.value if call.excinfo is not None else None
    if isinstance(exc, KnownLimitation):
        rep.outcome = "skipped"
        cap = exc.capability
        rep.wasxfail = f"known limitation [{cap.cell.id}]: {'; '.join(cap.cell.references)}"
    elif isinstance(exc, NotApplicable):
        rep.outcome = "skipped"
        path, line, _ = item.location
        rep.longrepr = (str(item.path), (line or 0) + 1, f"Skipped: {exc}")
    elif rep.passed and item.nodeid in _PENDING_XPASS:
        rep.wasxfail = _PENDING_XPASS.pop(item.nodeid)
