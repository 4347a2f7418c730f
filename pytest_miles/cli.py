"""`pytest-miles doctor | fingerprint | suite | compare | manifest | capabilities | matrix | parity-budget | verdicts`.

Exit codes follow the tools users know: 0 good, 1 a finding/difference, 2 unusable input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from pytest_miles._argtypes import positive_int, tp_size
from pytest_miles.errors import MilesError


def _dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps, json imported only for --json (start-up of `pytest-miles compare`)."""
    import json

    return json.dumps(obj, **kwargs)


def _doctor(args: argparse.Namespace) -> int:
    from pytest_miles.facts.doctor import FAIL, as_json, run_doctor, summary
    from pytest_miles.facts.doctor_env import (
        EnvInputError,
        check_run_env,
        load_runtime_env,
        parse_train_env_vars,
    )
    from pytest_miles.facts.fingerprint import collect
    from pytest_miles.facts.hardware import discover

    try:
        run_envs = []
        if args.runtime_env:
            run_envs.append((load_runtime_env(args.runtime_env), f"runtime_env {args.runtime_env}"))
        if args.train_env_vars:
            run_envs.append((parse_train_env_vars(args.train_env_vars), "--train-env-vars"))
        hw = discover(override=args.gpu_class)
        sglang = _sglang_mode(args)
    except (EnvInputError, ValueError) as exc:
        print(f"pytest-miles doctor: {exc}", file=sys.stderr)
        return 2
    # One verdict with the pytest header: the machine decides whether GPU-only variables apply
    # (`--gpu-class` names the run's machine when it is not this one). With --runtime-env or
    # --train-env-vars the run's environment is the one given, judged in full (it is for the GPU
    # run), and this shell's variables, which the run does not get, are not judged.
    findings = run_doctor(attention_backend=args.attention_backend, import_torch=args.torch,
                          gpu=bool(hw.nvidia), env_vars=not run_envs)
    for env, source in run_envs:
        findings += check_run_env(env, source, args.sglang_tp)
    failed = any(f.status == FAIL for f in findings)
    fp = collect(hw)
    if args.json:
        from pytest_miles.facts.kernel_caches import cache_dir, cache_key, warm_state

        key = cache_key(fp.to_json())
        state, detail = warm_state(cache_dir(), key)
        print(_dumps({**as_json(findings), "fingerprint": fp.to_json(),
                          "kernel_cache": {"state": state, "key": key, "detail": detail},
                          "sglang_deterministic_mode": as_json(sglang)["findings"]}, indent=2))
    else:
        print(f"pytest-miles doctor on {fp.header()}")
        for f in findings:
            print(f.line())
        for f in sglang:  # explanations, not checks: not counted in the summary
            print(f.line())
        print(summary(findings, hint=False))
        print(_kernel_cache_line(fp.to_json()))
    return 1 if failed else 0


def _sglang_mode(args: argparse.Namespace) -> list:
    """What SGLang's deterministic mode sets for the installed (or --sglang-version) SGLang and the
    --attention-backend, from the capability data; InputError for a version the data was not read from."""
    from pytest_miles.capabilities import installed_sglang_version, load_capabilities
    from pytest_miles.capabilities.deterministic_mode import doctor_findings

    caps = load_capabilities()
    version = args.sglang_version or installed_sglang_version()
    return doctor_findings(caps.applies, version, args.attention_backend, given=bool(args.sglang_version))


def _kernel_cache_line(fingerprint: dict) -> str:
    """Whether the JIT kernel caches are warm for this stack (informational: a cold cache is slow, not wrong)."""
    from pytest_miles.facts.kernel_caches import cache_dir, cache_key, warm_state

    state, detail = warm_state(cache_dir(), cache_key(fingerprint))
    return f"kernel cache: {state}: {detail}"


def _fingerprint(args: argparse.Namespace) -> int:
    from pytest_miles.facts.fingerprint import collect
    from pytest_miles.facts.hardware import discover

    fp = collect(discover(override=args.gpu_class, use_torch=args.torch))
    print(_dumps(fp.to_json(), indent=2) if args.json else fp.header())
    return 0


def _suite(args: argparse.Namespace, rest: list[str]) -> int:
    import pytest

    argv = ["--pyargs", "pytest_miles.suite", "-p", "no:cacheprovider", "-rs", *rest]
    return int(pytest.main(argv))


def _compare(args: argparse.Namespace) -> int:
    from pytest_miles.errors import CheckpointError, InputError  # the comparison is imported only when needed

    try:
        if args.iterations is not None:
            from pytest_miles.checks.iterations import first_diverging_iteration

            report = first_diverging_iteration(args.a, args.b, ignore=args.ignore or (), workers=args.workers)
        else:
            import os

            from pytest_miles.checks.compare import compare_checkpoints

            # set by the C `pytest-miles` (ckpt/dcpscan/front.c) when it found the pair's bytes or plans
            # different: the fast path (which only ever answers EQUAL) would read them again for nothing
            fast = os.environ.pop("_PYTEST_MILES_FAST_DECLINED", "") != "1"
            report = compare_checkpoints(args.a, args.b, ignore=args.ignore or (), first=args.first,
                                         workers=args.workers, fast=fast)
    except (CheckpointError, InputError) as exc:
        if args.json:
            print(_dumps({"equal": None, "error": str(exc)}, indent=2))
        else:
            print(f"pytest-miles compare: {exc}", file=sys.stderr)
        return 2
    print(_dumps(report.to_json(), indent=2) if args.json else report.render())
    return 0 if report.passed else 1


def _verdicts(args: argparse.Namespace) -> int:
    from pytest_miles.report.verdicts import compare_verdicts, read_report

    diff = compare_verdicts(read_report(args.old), read_report(args.new), subset=args.subset)
    print(_dumps(diff.to_json(), indent=2) if args.json else diff.render())
    return 0 if diff.unchanged else 1


def _manifest(args: argparse.Namespace) -> int:
    from pytest_miles.checks.checkpoints import CheckpointError, write_manifest

    try:
        out = write_manifest(args.dir, args.output)
    except CheckpointError as exc:
        print(f"pytest-miles manifest: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _matrix(args: argparse.Namespace) -> int:
    from pytest_miles.facts.hardware import discover
    from pytest_miles.facts.precision import render_matrix

    try:
        hw = discover(override=args.gpu)
    except ValueError as exc:
        print(f"pytest-miles matrix: --gpu: {exc}", file=sys.stderr)
        return 2
    print(render_matrix(hw))
    return 0


def _parity_budget(args: argparse.Namespace) -> int:
    import datetime
    import platform

    from pytest_miles.capabilities.parity_budgets import budget_from_files

    date = datetime.datetime.now(datetime.UTC).date().isoformat()
    host = platform.node() if args.host is None else args.host  # --host "" is an error, not this machine
    text = budget_from_files(args.reports, margin=args.margin, host=host, date=date, pair=args.pair)
    print(text, end="")
    return 0


def _capabilities(args: argparse.Namespace) -> int:
    from pytest_miles.capabilities import (
        CapabilityError,
        installed_sglang_version,
        load_capabilities,
        render_table,
        table_rows,
    )
    from pytest_miles.config.resolve import resolve

    try:
        caps = load_capabilities(args.file or resolve(None, "capabilities"))
    except CapabilityError as exc:
        print(f"pytest-miles capabilities: {exc}", file=sys.stderr)
        return 2
    if args.sglang_version is not None:
        from packaging.version import InvalidVersion, Version

        try:
            Version(args.sglang_version)
        except InvalidVersion:
            print(f"pytest-miles capabilities: --sglang-version {args.sglang_version!r}: not a version "
                  "(PEP 440, e.g. 0.5.17)", file=sys.stderr)
            return 2
    version = args.sglang_version or installed_sglang_version()
    if args.json:
        rows = [{"backend": backend, "mode": mode, "status": cap.status, "cell": cap.cell.id if cap.cell else None,
                 "describe": cap.describe()} for backend, mode, cap in table_rows(caps, version)]
        print(_dumps({"sglang": version, "sources": caps.sources, "cells": rows}, indent=2))
    else:
        print("\n".join(render_table(caps, version)))
    return 0


def _version() -> str:
    import platform

    from pytest_miles import __version__

    try:
        from importlib.metadata import version

        pytest_version = version("pytest")
    except Exception:  # noqa: BLE001 - a version line must not fail
        pytest_version = "not installed"
    return f"pytest-miles {__version__} (pytest {pytest_version}, python {platform.python_version()})"


class _VersionAction(argparse.Action):
    """`--version`, computed when asked for (importlib.metadata costs ~10 ms on every command)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the versions and exit", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(_version())  # to stdout, as argparse's own version action
        parser.exit()


_COMMANDS = ("doctor", "fingerprint", "capabilities", "suite", "matrix", "compare", "parity-budget", "manifest",
             "verdicts")


class _Skipped:
    """A subcommand's parser that this command line does not name: every call on it does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class _Only:
    """Stands in for the subparsers: adds the command asked for (all of them for None)."""

    def __init__(self, subs: Any, only: str | None) -> None:
        self.subs, self.only = subs, only

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        return self.subs.add_parser(name, **kwargs) if self.only in (None, name) else _Skipped()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (`only`, a command name) one with that subcommand alone: building every
    subcommand's arguments is ~6 ms of `pytest-miles compare`'s start-up; parsing that command's line
    gives the same result and the same errors either way."""
    parser = argparse.ArgumentParser(
        prog="pytest-miles", description="Determinism checks for LLM RL stacks (SGLang + Megatron-core).")
    parser.add_argument("--version", action=_VersionAction)
    sub = _Only(parser.add_subparsers(dest="command", required=True), only)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--gpu-class", help="pretend these GPUs are present (e.g. h100, a100x8, none)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--torch", action="store_true",
                        help="import torch to check it (deterministic algorithms, CUDA) in this process")

    d = sub.add_parser("doctor", parents=[common],
                       help="check the environment against the Miles reproducibility guide's "
                       "troubleshooting table; exit 1 when a check fails")
    d.add_argument("--attention-backend", default=None, help="the SGLang attention backend you configure")
    d.add_argument("--runtime-env", metavar="FILE.json", default=None,
                   help="also check a Ray runtime_env JSON file's env_vars (as a Miles run will get them)")
    d.add_argument("--train-env-vars", metavar="JSON", default=None,
                   help="also check Miles' --train-env-vars JSON object of env vars")
    d.add_argument("--sglang-tp", metavar="N", type=tp_size, default=None,
                   help="the rollout's SGLang --tp-size (TP > 1: SGLang sets its own NCCL_ALGO)")
    d.add_argument("--sglang-version", default=None,
                   help="explain what --enable-deterministic-inference sets in this SGLang version (one the capability "
                   "data was read from, 0.5.17 to 0.5.23) instead of the installed one")
    d.set_defaults(func=_doctor)

    f = sub.add_parser("fingerprint", parents=[common], help="print what decides bitwise results here")
    f.set_defaults(func=_fingerprint)

    cap = sub.add_parser("capabilities", help="what SGLang promises here, per attention backend x mode: promised, "
                         "known limitation (with its reference) or not applicable")
    cap.add_argument("--file", help="a capability file read before the packaged one (as --miles-capabilities)")
    cap.add_argument("--sglang-version", help="show the table for this SGLang version instead of the installed one")
    cap.add_argument("--json", action="store_true")
    cap.set_defaults(func=_capabilities)

    s = sub.add_parser("suite", help="run the bundled determinism suite (extra args go to pytest)")
    s.set_defaults(func=None)

    x = sub.add_parser("matrix", help="the rollout x training precision matrix, marked for this (or a named) GPU")
    x.add_argument("--gpu", default=None,
                   help="a GPU model or class instead of this machine's (h100, b200, a100, mi300x)")
    x.set_defaults(func=_matrix)

    _add_file_commands(sub)
    return parser


def _add_file_commands(sub: Any) -> None:
    """The commands that read files and give a verdict on them: compare, parity-budget, manifest, verdicts."""
    c = sub.add_parser("compare", help="compare two checkpoints (or one against a manifest) bit for bit; "
                       "exit 0 equal, 1 different, 2 unusable input")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--json", action="store_true")
    c.add_argument("--first", action="store_true",
                   help="stop at the first difference: its tensor's first differing element, the rest not compared")
    c.add_argument("--ignore", action="append", help="glob of tensor/key/file names to skip (repeatable)")
    c.add_argument("--workers", type=positive_int, default=None,
                   help="file pairs read in parallel (>= 1; default 2, or 1 on a one-core machine)")
    c.add_argument("--iterations", choices=["all"], default=None,
                   help="A and B are Megatron run dirs: compare every iteration both saved, in order, and report "
                        "the first diverging one with its first differing tensor")
    c.set_defaults(func=_compare)

    pb = sub.add_parser("parity-budget", help="a train-rollout parity budget ([[budget]] TOML) from N parity reports "
                        "of one configuration (ParityReport.to_json() files): exact, or margin x the worst run")
    pb.add_argument("reports", nargs="+", help="parity report JSON files, one per run (at least 2)")
    pb.add_argument("--margin", type=float, default=1.5, help="tolerance = margin x the worst run (default 1.5)")
    pb.add_argument("--host", default=None, help="the host named in the calibration (default: this machine's name)")
    pb.add_argument("--pair", default="train_vs_decode",
                    help="train_vs_decode (default), train_vs_prefill or prefill_vs_decode")
    pb.set_defaults(func=_parity_budget)

    m = sub.add_parser("manifest", help="write per-tensor, per-chunk and per-layer digests of a checkpoint")
    m.add_argument("dir")
    m.add_argument("-o", "--output", default=None,
                   help="manifest path (default: beside the checkpoint, <name>.manifest.json; never inside it; "
                   "missing parent dirs are created)")
    m.set_defaults(func=_manifest)

    v = sub.add_parser("verdicts", help="which verdicts changed between two runs' reports (--miles-report JSON), "
                       "check by check: exit 0 every verdict unchanged, 1 changed, 2 unusable input")
    v.add_argument("old")
    v.add_argument("new")
    v.add_argument("--json", action="store_true")
    v.add_argument("--subset", action="store_true",
                   help="the new run selected some of the old run's tests (a profile, -k): checks only the old "
                   "report has are counted, not listed, and are no change")
    v.set_defaults(func=_verdicts)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[:1] or (bool(argv) and argv[0] != "suite" and "--debug" in argv)
    if debug:
        argv.remove("--debug")
    return _user_errors(_main, argv, debug)


def _user_errors(run, argv: list[str], debug: bool) -> int:
    """Bad input never ends in a traceback: one line naming it, exit 2 (`--debug` shows the traceback)."""
    try:
        return run(argv)
    except BrokenPipeError:  # `pytest-miles compare A B | head`: the reader left, as for any Unix tool
        sys.stderr.close()
        return 141
    except (ValueError, TypeError, OSError, LookupError, RuntimeError) as exc:
        if debug:
            raise
        cmd = argv[0] if argv else ""
        if isinstance(exc, MilesError):  # ours: the message names the input and what is accepted
            text = str(exc).removeprefix(f"{cmd}: ")
        else:  # anything else is not a message written for a user: say what it was and how to see more
            text = f"{exc} ({type(exc).__name__}; --debug shows the traceback)"
        print(f"pytest-miles {cmd}: {text}".replace("\n", " "), file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    parser = build_parser(argv[0] if argv and argv[0] in _COMMANDS else None)
    if argv and argv[0] == "suite":  # everything after `suite` belongs to pytest
        return _suite(argparse.Namespace(), argv[1:])
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
