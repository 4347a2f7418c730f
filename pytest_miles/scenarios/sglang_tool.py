"""Cross-check with SGLang's own determinism tool: `python -m sglang.test.test_deterministic` run
against the same live server, in each mode it shares with ours, beside our check of the matching
mode; the report says, per mode, what the tool concluded, what ours concluded, and whether they
agree. The tool's modes and ours: single <-> single, prefix (four prompts cut from one long prompt,
so a long prompt is in every batch) <-> prefix_long_anchor, radix_cache <-> radix_cache, p_vs_d <->
p_vs_d. The tool sends text (the server needs a tokenizer), prefixes of up to 4,097 characters and
token ids up to 50,000: a mode whose inputs the served model cannot take is not applicable, named."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_miles.errors import InputError, NotApplicable
from pytest_miles.placement.processes import exited
from pytest_miles.recording import recorded

OURS = {"single": "single", "prefix": "prefix_long_anchor", "radix_cache": "radix_cache", "p_vs_d": "p_vs_d"}
# What each tool mode needs of the served model: (tokens of context, vocabulary size), read from the tool's
# source (sglang/test/test_deterministic.py, 0.5.17: LONG_PROMPT[:4097] with 100 new tokens; random ids in
# 100..50000 for radix_cache; p_vs_d slices of up to 4,096 characters).
NEEDS = {"single": (200, 0), "prefix": (4300, 0), "radix_cache": (300, 50001), "p_vs_d": (4300, 0)}
SINGLE = re.compile(r"Total samples: (\d+), Unique samples: (\d+)")
PREFIX = re.compile(r"Prompt (\d+) with prefix length (\d+): total samples: (\d+), Unique samples: (\d+)")


@dataclass
class ToolVerdict:
    mode: str
    deterministic: bool | None  # None: the tool's output said neither (see detail)
    detail: str


def parse_tool_output(mode: str, text: str) -> ToolVerdict:
    """The tool's conclusion from its printed output (its functions return counts, its CLI prints them)."""
    if mode == "single":
        m = SINGLE.findall(text)
        if not m:
            return ToolVerdict(mode, None, "no 'Total samples: N, Unique samples: U' line")
        total, unique = map(int, m[-1])
        return ToolVerdict(mode, unique == 1, f"{total} samples, {unique} unique")
    if mode == "prefix":
        rows = PREFIX.findall(text)
        if not rows:
            return ToolVerdict(mode, None, "no 'Prompt i with prefix length L: ...' lines")
        uniques = {int(length): int(u) for _, length, _, u in rows}
        return ToolVerdict(mode, all(u == 1 for u in uniques.values()),
                           "unique samples by prefix length: " + ", ".join(f"{k}: {v}" for k, v in uniques.items()))
    if mode == "radix_cache":
        if "TEST PASSED - Radix cache is consistent" in text:
            return ToolVerdict(mode, True, "cached and uncached prefill give the same token and logprob")
        if "TEST FAILED - Radix cache produces different results" in text:
            return ToolVerdict(mode, False, "cached and uncached prefill differ")
        return ToolVerdict(mode, None, "neither 'TEST PASSED' nor 'TEST FAILED'")
    if mode == "p_vs_d":
        compared = text.count("Compare sequence")
        bad = text.count("Token mismatch") + text.count("Logprobs mismatch")
        if not compared:
            return ToolVerdict(mode, None, "no 'Compare sequence' lines")
        return ToolVerdict(mode, bad == 0, f"{compared} sequences compared, {bad} token/logprob mismatches")
    raise InputError(f"mode: {mode!r} is not one of the tool's modes shared with ours ({', '.join(OURS)})")


def run_tool(url: str, mode: str, *, n_trials: int, max_new_tokens: int, timeout: float = 900.0,
             python: str = sys.executable) -> tuple[ToolVerdict, str]:
    """Run SGLang's tool against `url` (http://host:port) in `mode`; its verdict and its output."""
    host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
    cmd = [python, "-m", "sglang.test.test_deterministic", "--host", host, "--port", port, "--test-mode", mode,
           "--n-trials", str(n_trials), "--max-new-tokens", str(max_new_tokens)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return ToolVerdict(mode, None, f"the tool did not finish in {timeout:g} s"), out
    out = done.stdout + done.stderr
    verdict = parse_tool_output(mode, out)
    if done.returncode != 0 and verdict.deterministic is None:
        verdict.detail += f"; the tool {exited(done.returncode)}"
    return verdict, out


@dataclass
class CrossCheckReport:
    engine: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def disagreements(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["agree"] is False]

    @property
    def passed(self) -> bool:
        return not self.disagreements

    def render(self, limit: int = 10) -> str:
        lines = [f"cross-check with SGLang's test_deterministic on {self.engine}: "
                 f"{'AGREE' if self.passed else 'DISAGREE'} ({sum(r['agree'] is True for r in self.rows)} modes agree, "
                 f"{len(self.disagreements)} disagree, {sum(r['agree'] is None for r in self.rows)} not comparable)"]
        for r in self.rows:
            lines.append(f"  {r['tool_mode']:<12} tool: {r['tool']:<26} ours [{r['ours_mode']}]: {r['ours']:<20} "
                         f"{ {True: 'agree', False: 'DISAGREE', None: 'not comparable'}[r['agree']] }"
                         + (f" ({r['why']})" if r.get("why") else ""))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"engine": self.engine, "passed": self.passed, "rows": self.rows}


def _model_limits(model_dir: str | Path) -> tuple[int, int]:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return int(cfg.get("max_position_embeddings") or 0), int(cfg.get("vocab_size") or 0)


# Our run of a mode in the tool's shape, where the default shape would test something smaller: the tool's
# p_vs_d scores sequences of up to ~4,300 positions (longer than flashinfer's 2,048-token decode split and
# 4,096-token prefill split); our default (prompts up to 48 tokens) never crosses them, and passed on
# flashinfer where the tool found mismatches (H200, 2026-12-04).
TOOL_SHAPE: dict[str, dict[str, int]] = {"p_vs_d": {"prompt_len": 4096}}


def _ours(engine, mode: str, trials: int) -> str:
    """Our check of `mode` judged as in the suite, in the tool's shape (TOOL_SHAPE): passed / failed /
    known limitation / not applicable."""
    from pytest_miles.checks.batch_invariance import check_batch_invariance, judge_report
    from pytest_miles.errors import KnownLimitation, UnexpectedPass

    try:
        judge_report(engine, check_batch_invariance(engine, mode, trials, **TOOL_SHAPE.get(mode, {})))
    except KnownLimitation:
        return "known limitation"
    except UnexpectedPass:  # passed where the data lists a limitation: a pass all the same
        return "passed"
    except NotApplicable:
        return "not applicable"
    except AssertionError:
        return "failed"
    return "passed"


@recorded("cross-check with SGLang's test_deterministic")
def cross_check_sglang_tool(engine, model_dir: str | Path, *, modes: tuple[str, ...] = tuple(OURS), trials: int = 8,
                            max_new_tokens: int = 32, timeout: float = 900.0) -> CrossCheckReport:
    """Each shared mode: the tool's conclusion and ours on the same server. AssertionError when they
    disagree (one says deterministic, the other not); not comparable where either could not run."""
    bad = [m for m in modes if m not in OURS]
    if bad:
        raise InputError(f"modes: {bad} not accepted; the tool's modes shared with ours: {', '.join(OURS)}")
    url = getattr(engine, "url", None)
    if not url:
        raise InputError(f"engine: {type(engine).__name__} is not a served engine (SGLang's tool talks HTTP)")
    import importlib.util

    if importlib.util.find_spec("sglang") is None:
        raise NotApplicable("SGLang's test_deterministic needs sglang installed where the check runs")
    context, vocab = _model_limits(model_dir)
    report = CrossCheckReport(getattr(engine, "name", type(engine).__name__))
    for mode in modes:
        need_ctx, need_vocab = NEEDS[mode]
        row: dict[str, Any] = {"tool_mode": mode, "ours_mode": OURS[mode]}
        if context < need_ctx or vocab < need_vocab:
            row.update(tool="not run", ours="not run", agree=None,
                       why=f"the tool's inputs need {need_ctx} positions and {need_vocab or 'any'} token ids; the "
                           f"model has {context} and {vocab}")
            report.rows.append(row)
            continue
        engine.flush_cache()
        verdict, _ = run_tool(url, mode, n_trials=trials, max_new_tokens=max_new_tokens, timeout=timeout)
        engine.flush_cache()
        ours = _ours(engine, OURS[mode], trials)
        tool = {True: "deterministic", False: "not deterministic", None: "no verdict"}[verdict.deterministic]
        row.update(tool=tool, tool_detail=verdict.detail, ours=ours)
        if verdict.deterministic is None or ours == "not applicable":
            row.update(agree=None, why=verdict.detail if verdict.deterministic is None else
                       "ours is not applicable here (the tool's pass may be vacuous)")
        else:
            row["agree"] = verdict.deterministic == (ours == "passed")
        report.rows.append(row)
    if not report.passed:
        raise AssertionError(report.render())
    return report
