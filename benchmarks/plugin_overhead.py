"""Load-time overhead of the plugin: `pytest --collect-only -q` over 500 trivial tests,
with the plugin vs `-p no:miles`, median of several alternating runs. Target: ratio < 1.05.

    python benchmarks/plugin_overhead.py [--runs 9] [--tests 500]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _time(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--tests", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "pytest.ini").write_text("[pytest]\n")
        per_file = 50
        for i in range(args.tests // per_file):
            body = "\n".join(f"def test_{i}_{j}():\n    pass\n" for j in range(per_file))
            (root / f"test_{i}.py").write_text(body)
        base = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
        variants = {"without (-p no:miles)": base + ["-p", "no:miles"], "with pytest-miles": base}
        for cmd in variants.values():  # warm the page cache and bytecode
            _time(cmd, root)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.runs):  # alternate, so drift hits both equally
            for name, cmd in variants.items():
                times[name].append(_time(cmd, root))
        # The header (fingerprint + doctor) is shown without -q: measure that path too.
        verbose = {k: v[:-1] if v[-1] == "-q" else v for k, v in variants.items()}
        vtimes: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.runs):
            for name, cmd in verbose.items():
                vtimes[name].append(_time([c for c in cmd if c != "-q"], root))
    print(f"plugin load-time overhead, {args.tests} trivial tests, median of {args.runs} runs")
    for label, data in (("--collect-only -q", times), ("--collect-only (header shown)", vtimes)):
        off = statistics.median(data["without (-p no:miles)"])
        on = statistics.median(data["with pytest-miles"])
        best = min(data["with pytest-miles"]) / min(data["without (-p no:miles)"])
        print(f"  {label:32} without {off * 1000:7.1f} ms  with {on * 1000:7.1f} ms  "
              f"ratio {on / off:.3f} (median)  {best:.3f} (best of each)")


if __name__ == "__main__":
    main()
