"""`pytest-miles compare` vs `md5sum` (over both sides) and `cmp` on the same freshly written pairs,
page cache warm for all tools, one run printing every shape the issue names:

  dcp-1g       1 GiB torch DCP pair (16 x 64 MiB tensors)
  dcp-4g       4 GiB torch DCP pair (only where disk and memory allow: checked, and said if skipped)
  small-20k    20,000 small tensors (1-16 KiB) in a DCP pair: the O(n) case
  pt-names     1 GiB torch.save pair whose file names differ (a/model_a.pt vs b/model_b.pt)
  hf-sharded   1 GiB safetensors dir in 4 shards + index, pair

md5sum is what the seed's recipe runs (and it only says "differs", not where); cmp stops at the
first differing byte and knows nothing of tensors; compare checks every tensor bit for bit.

    python benchmarks/compare_vs_md5sum.py [--runs 3] [--shapes dcp-1g,...] [--dir DIR]
    PYTEST_MILES_NATIVE=0 python benchmarks/compare_vs_md5sum.py ...   # without the native DCP reader

Prints, per shape: median wall seconds (process start included), GB/s over both sides, peak RSS,
and compare's speed-up over md5sum and cmp; then the targets (>= 5x md5sum, RSS < 64 MiB + the
largest tensor). Not run in CI: it writes GiBs.
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

SHAPES = ("dcp-1g", "dcp-4g", "small-20k", "pt-names", "hf-sharded")
MIB = 2**20


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


# ---- writers (run in a child, so that this process stays small) ------------------------------


def _big_state(gib: float, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    n = max(1, round(gib * 16))  # 64 MiB tensors
    return {f"decoder.layers.{i}.mlp.linear_fc1.weight": torch.randn(4096, 4096, generator=g) for i in range(n)}


def _small_state(n: int = 20_000) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(256, 4097, (n,), generator=g)  # 1-16 KiB of float32
    return {f"model.layers.{i // 10}.p{i % 10}": torch.randn(int(s), generator=g) for i, s in enumerate(sizes)}


def _dcp_save(state: dict, path: Path) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    dcp.save(state, checkpoint_id=str(path))


def _write(shape: str, root: Path, side: str) -> None:
    import torch

    path = root / side
    if shape in ("dcp-1g", "dcp-4g"):
        _dcp_save(_big_state(1.0 if shape == "dcp-1g" else 4.0), path)
    elif shape == "small-20k":
        _dcp_save(_small_state(), path)
    elif shape == "pt-names":
        path.mkdir(parents=True)
        torch.save(_big_state(1.0), path / f"model_{side}.pt")
    elif shape == "hf-sharded":
        from safetensors.torch import save_file

        path.mkdir(parents=True)
        state = _big_state(1.0)
        names = list(state)
        weight_map = {}
        for k in range(4):
            shard = f"model-{k + 1:05d}-of-00004.safetensors"
            part = names[k::4]
            save_file({n: state[n] for n in part}, str(path / shard), {"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard))
        import json

        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def _largest_tensor_mib(shape: str) -> float:
    return 64.0 if shape != "small-20k" else 16 / 1024


def bench(shape: str, root: Path, runs: int) -> dict:
    for side in ("a", "b"):
        subprocess.run([sys.executable, __file__, "--write", shape, "--dir", str(root), "--side", side], check=True)
    a, b = root / "a", root / "b"
    if shape == "pt-names":
        a, b = a / "model_a.pt", b / "model_b.pt"
    files_a, files_b = _files(root / "a"), _files(root / "b")
    size = sum(p.stat().st_size for p in files_a + files_b)
    for f in files_a + files_b:  # warm the page cache for every tool
        with open(f, "rb") as fh:
            while fh.read(64 * MIB):
                pass
    cmp_script = "; ".join(f"cmp -s '{x}' '{y}'" for x, y in zip(files_a, files_b)) + "; true"
    tools = {
        "md5sum": ["md5sum", *map(str, files_a + files_b)],
        "cmp": ["sh", "-c", cmp_script],
        "compare": [sys.executable, "-m", "pytest_miles.cli", "compare", str(a), str(b)],
    }
    if os.environ.get("PYTEST_MILES_NATIVE") == "0":
        print(f"{shape}: PYTEST_MILES_NATIVE=0: compare takes the Python path only")
    out = {"shape": shape, "bytes": size, "files": len(files_a) + len(files_b), "tools": {}}
    for name, cmd in tools.items():
        results = [_run(cmd) for _ in range(runs)]
        out["tools"][name] = {"s": statistics.median(t for t, _, _ in results),
                              "rss": max(r for _, r, _ in results), "rc": results[-1][2]}
    if out["tools"]["compare"]["rc"] != 0:
        sys.exit(f"{shape}: compare did not report the pair equal (exit {out['tools']['compare']['rc']})")
    out["largest_tensor_mib"] = _largest_tensor_mib(shape)
    return out


def _room_for(gib_pair: float, root: Path) -> str | None:
    free_disk = shutil.disk_usage(root).free / 2**30
    avail = next((int(line.split()[1]) / 2**20 for line in open("/proc/meminfo") if line.startswith("MemAvailable")), 0)
    if free_disk < gib_pair * 1.5:
        return f"{free_disk:.1f} GiB free disk < {gib_pair * 1.5:.1f} GiB needed"
    if avail < gib_pair * 1.5:
        return f"{avail:.1f} GiB available memory < {gib_pair * 1.5:.1f} GiB (the pair must fit the page cache)"
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dir", default=None, help="where to write the pairs (default: a temp dir)")
    ap.add_argument("--write", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:
        _write(args.write, Path(args.dir), args.side)
        return
    shapes = [s for s in args.shapes.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES]
    if bad or args.runs < 1:
        sys.exit(f"--shapes: unknown {bad} (choose from {', '.join(SHAPES)}); --runs must be >= 1")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; median of {args.runs} run(s), "
          "page cache warm, process start included; GB/s over both sides")
    rows = []
    for shape in shapes:
        root = Path(tempfile.mkdtemp(dir=args.dir, prefix=f"miles-bench-{shape}-"))
        try:
            why = _room_for(8.0, root) if shape == "dcp-4g" else None
            if why:
                print(f"{shape:11s} skipped: {why}")
                continue
            r = bench(shape, root, args.runs)
            rows.append(r)
            gb = r["bytes"] / 1e9
            line = [f"{shape:11s} {r['bytes'] / 2**30:5.2f} GiB in {r['files']:3d} files"]
            for name in ("md5sum", "cmp", "compare"):
                t = r["tools"][name]
                line.append(f"{name} {t['s']:6.2f} s {gb / t['s']:5.2f} GB/s {t['rss']:6.1f} MiB")
            c = r["tools"]["compare"]["s"]
            line.append(f"x{r['tools']['md5sum']['s'] / c:5.1f} vs md5sum, x{r['tools']['cmp']['s'] / c:4.1f} vs cmp")
            print(" | ".join(line), flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print("targets: compare >= 5x faster than md5sum; compare peak RSS < 64 MiB + the largest tensor")
    for r in rows:
        c = r["tools"]["compare"]
        speed = r["tools"]["md5sum"]["s"] / c["s"]
        limit = 64 + r["largest_tensor_mib"]
        print(f"  {r['shape']:11s} speed-up {speed:5.1f}x {'MET' if speed >= 5 else 'NOT MET'}; "
              f"peak RSS {c['rss']:.1f} MiB < {limit:.1f} MiB {'MET' if c['rss'] < limit else 'NOT MET'}")


if __name__ == "__main__":
    main()
