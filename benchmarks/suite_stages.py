"""Where the bundled suite's time goes, cold and warm: runs `pytest-miles suite` twice with one fresh
kernel cache directory (`--miles-kernel-cache-dir`: empty for the first run, filled by it for the
second) and prints, per run, the wall time and every stage the report timed (engine start-ups,
megatron-core launches) and every check's duration; then the warm/cold ratio of each, and of the
whole run (the baseline is the cold run of the same invocation).

    python benchmarks/suite_stages.py [--out DIR] [--profile full|commit] [-- pytest args...]
    python benchmarks/suite_stages.py --out /tmp/st -- --miles-engine=sglang --miles-attention-backend=flashinfer

A run's own pytest args follow `--`. Without a GPU it measures the embedded default (reference
engine, megatron-core on gloo), where there are no kernels to compile: cold and warm then differ only
by noise. With `--cold-only` the second run is left out; `--warm-only` runs only the second, over the cache a
`--cold-only` run left in the same --out (so that other work can come between the two), or in `--cache`.

With `--ab-prestart` it runs the suite twice over the same kernel cache, `--miles-engine-prestart=off`
then `on` (engines started when first asked for, then all at session start in the background while
the tests that need none run), and prints the on/off ratio of each stage and of the whole run. Give it
a cache a `--cold-only` run filled (the same --out), or run it where there is nothing to compile (CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_suite(out: Path, name: str, cache: Path, profile: str, extra: list[str]) -> dict:
    report = out / f"{name}-report.json"
    cmd = [sys.executable, "-m", "pytest_miles.cli", "suite", "-p", "no:randomly", f"--miles-report={report}",
           f"--miles-kernel-cache-dir={cache}", f"--miles-suite-profile={profile}", *extra]
    t0 = time.monotonic()
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - t0
    data = json.loads(report.read_text()) if report.exists() else {"checks": [], "summary": "no report"}
    return {"rc": rc, "wall": wall, "data": data}


def stages(data: dict) -> dict[str, float]:
    """'stage label' -> seconds, and 'check: name' -> seconds, in the order the run met them."""
    out: dict[str, float] = {}
    seen_tests = set()
    for c in data["checks"]:
        if c["nodeid"] not in seen_tests:
            seen_tests.add(c["nodeid"])
            for i, (label, seconds) in enumerate(c.get("stages", [])):
                out[f"  stage: {label} [{c['nodeid'].split('::')[-1]}#{i}]"] = seconds
        out[f"check: {c['check']}"] = c.get("duration_s", 0.0)
    return out


def background(stages_of_run: dict[str, float], what: str) -> tuple[float, float]:
    """(seconds the background starts of `what` took, seconds tests waited for them): the engine factory
    and the trainer pool name these stages 'starting ... in the background' and 'waiting for ..., started
    in the background'; `what` is "engines" or "ranks" (megatron-core rank processes)."""
    def mine(k: str) -> bool:
        return ("megatron-core ranks" in k) == (what == "ranks")

    started = sum(v for k, v in stages_of_run.items()
                  if k.startswith("  stage: starting ") and "in the background" in k and mine(k))
    waited = sum(v for k, v in stages_of_run.items() if k.startswith("  stage: waiting for ") and mine(k))
    return started, waited


def start_phases(stages_of_run: dict[str, float]) -> dict[str, list[float]]:
    """Phase of an engine start-up (engines/sglang_startup.py, stages '<engine> start-up: <phase>') ->
    its seconds in each start that had it."""
    out: dict[str, list[float]] = {}
    for k, v in stages_of_run.items():
        if " start-up: " in k:
            out.setdefault(k.split(" start-up: ", 1)[1].rsplit(" [", 1)[0], []).append(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="folder for the logs and reports (default: a temporary one)")
    ap.add_argument("--profile", default="full", choices=("full", "commit"))
    ap.add_argument("--cold-only", action="store_true")
    ap.add_argument("--warm-only", action="store_true",
                    help="only the warm run, over the kernel cache an earlier --cold-only run left in --out")
    ap.add_argument("--ab-prestart", action="store_true",
                    help="two runs over the same cache: --miles-engine-prestart=off, then on; their ratio")
    ap.add_argument("--cache", default=None,
                    help="the kernel cache directory (default: --out/kernel-cache); a --warm-only run of another "
                         "profile can reuse the cache of an earlier run and keep its own logs in its own --out")
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="miles-suite-stages-"))
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out / "kernel-cache"
    if args.ab_prestart:
        runs = {name: run_suite(out, name.replace(" ", "-"), cache, args.profile,
                                [*args.pytest_args, f"--miles-engine-prestart={name.split()[-1]}"])
                for name in ("prestart off", "prestart on")}
    else:
        runs = {} if args.warm_only else {"cold": run_suite(out, "cold", cache, args.profile, args.pytest_args)}
        if not args.cold_only:
            runs["warm"] = run_suite(out, "warm", cache, args.profile, args.pytest_args)
    table = {name: stages(r["data"]) for name, r in runs.items()}
    keys = list(dict.fromkeys(k for t in table.values() for k in t))
    names = list(runs)
    print(f"suite stages, profile {args.profile}, args {' '.join(args.pytest_args) or '(none)'}; logs in {out}")
    print(f"{'':100} " + " ".join(f"{n + ' s':>13}" for n in names) + (f" {'ratio':>9}" if len(names) == 2 else ""))
    for k in keys:
        vals = [table[n].get(k) for n in names]
        cells = " ".join(f"{v if v is not None else float('nan'):13.1f}" for v in vals)
        ratio = f" {vals[1] / vals[0]:9.2f}" if len(vals) == 2 and vals[0] and vals[1] is not None else ""
        print(f"{k[:100]:100} {cells}{ratio}")
    for name, r in runs.items():
        print(f"{name}: wall {r['wall']:.1f} s, exit {r['rc']}: {r['data'].get('summary', '')}")
        for phase, values in start_phases(table[name]).items():
            print(f"{name}: engine start-ups, {phase}: {sum(values):.1f} s over {len(values)} "
                  f"(longest {max(values):.1f} s)")
        for what, words in (("engines", "engines"), ("ranks", "megatron-core rank groups")):
            started, waited = background(table[name], what)
            if started:
                print(f"{name}: {words} started in the background: {started:.1f} s of start-up, {waited:.1f} s of "
                      f"it waited for by tests, {started - waited:.1f} s hidden behind other tests")
    if len(names) == 2:
        print(f"whole run {names[1]}/{names[0]}: {runs[names[1]]['wall'] / runs[names[0]]['wall']:.2f}x")
    return max(r["rc"] for r in runs.values())


if __name__ == "__main__":
    sys.exit(main())
