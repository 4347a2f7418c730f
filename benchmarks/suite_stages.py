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
`--cold-only` run left in the same --out (so that other work can come between the two).
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="folder for the logs and reports (default: a temporary one)")
    ap.add_argument("--profile", default="full", choices=("full", "commit"))
    ap.add_argument("--cold-only", action="store_true")
    ap.add_argument("--warm-only", action="store_true",
                    help="only the warm run, over the kernel cache an earlier --cold-only run left in --out")
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="miles-suite-stages-"))
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "kernel-cache"
    runs = {} if args.warm_only else {"cold": run_suite(out, "cold", cache, args.profile, args.pytest_args)}
    if not args.cold_only:
        runs["warm"] = run_suite(out, "warm", cache, args.profile, args.pytest_args)
    table = {name: stages(r["data"]) for name, r in runs.items()}
    keys = list(dict.fromkeys(k for t in table.values() for k in t))
    print(f"suite stages, profile {args.profile}, args {' '.join(args.pytest_args) or '(none)'}; logs in {out}")
    print(f"{'':100} {'cold s':>8} {'warm s':>8} {'warm/cold':>9}")
    for k in keys:
        cold, warm = table.get("cold", {}).get(k), table.get("warm", {}).get(k)
        ratio = f"{warm / cold:9.2f}" if cold and warm is not None else " " * 9
        print(f"{k[:100]:100} {cold if cold is not None else float('nan'):8.1f} "
              f"{warm if warm is not None else float('nan'):8.1f} {ratio}")
    for name, r in runs.items():
        print(f"{name}: wall {r['wall']:.1f} s, exit {r['rc']}: {r['data'].get('summary', '')}")
    if "warm" in runs and "cold" in runs:
        print(f"whole run warm/cold: {runs['warm']['wall'] / runs['cold']['wall']:.2f}x")
    return max(r["rc"] for r in runs.values())


if __name__ == "__main__":
    sys.exit(main())
