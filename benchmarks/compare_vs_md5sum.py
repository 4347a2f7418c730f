"""`pytest-miles compare` vs `md5sum` on the same freshly written pair of ~1 GiB torch DCP
checkpoints, page cache warm for both. md5sum is what the seed's recipe runs (and it would
not even look at the .distcp weights); compare checks every tensor bit for bit.

    python benchmarks/compare_vs_md5sum.py [--gib 1.0] [--runs 3]
Prints wall times, the ratio, compare's GB/s and each tool's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one command. GNU time measures the RSS: a
    child forked from this Python would count this process's pages until its exec."""
    with tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-o", rss.name, "-f", "%M", *cmd],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        peak = int(rss.read().strip().splitlines()[-1]) / 1024
    return wall, peak, proc.returncode


def _write(path: Path, gib: float) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    g = torch.Generator().manual_seed(0)
    n = max(1, round(gib * 16))  # 64 MiB tensors
    state = {f"decoder.layers.{i}.mlp.linear_fc1.weight": torch.randn(4096, 4096, generator=g) for i in range(n)}
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    dcp.save(state, checkpoint_id=str(path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the pair (default: a temp dir)")
    ap.add_argument("--write", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:
        _write(Path(args.write), args.gib)
        return
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="miles-bench-"))
    try:
        a, b = root / "run1", root / "run2"
        # Written by a child, so that this process stays small: a forked child's peak RSS
        # counts the parent's pages until exec.
        for path in (a, b):
            subprocess.run([sys.executable, __file__, "--write", str(path), "--gib", str(args.gib)], check=True)
        files = sorted(str(p) for d in (a, b) for p in d.iterdir())
        size = sum(os.path.getsize(f) for f in files)
        for f in files:  # warm the page cache for both tools
            with open(f, "rb") as fh:
                while fh.read(64 * 2**20):
                    pass
        md5 = [_run(["md5sum", *files]) for _ in range(args.runs)]
        cmp = [_run([sys.executable, "-m", "pytest_miles.cli", "compare", str(a), str(b)]) for _ in range(args.runs)]
        if any(rc != 0 for _, _, rc in cmp):
            sys.exit("compare did not report the pair equal")
        t_md5 = statistics.median(t for t, _, _ in md5)
        t_cmp = statistics.median(t for t, _, _ in cmp)
        print(f"pair of torch DCP checkpoints, {size / 2**30:.2f} GiB in {len(files)} files, page cache warm, "
              f"median of {args.runs}")
        print(f"  md5sum over both dirs      {t_md5:6.2f} s  {size / t_md5 / 1e9:5.2f} GB/s  "
              f"peak RSS {max(r for _, r, _ in md5):7.1f} MiB")
        print(f"  pytest-miles compare A B   {t_cmp:6.2f} s  {size / t_cmp / 1e9:5.2f} GB/s  "
              f"peak RSS {max(r for _, r, _ in cmp):7.1f} MiB  (every tensor, bitwise; process start included)")
        print(f"  speed-up over md5sum: {t_md5 / t_cmp:.2f}x (target >= 3x)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
