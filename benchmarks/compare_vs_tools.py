"""`pytest-miles compare` beside the Unix tools on the same checkpoint pairs, page cache warm:
`cat` (reading both sides: the read limit), `md5sum` and `xxhsum` (hashing both sides: what the
seeds' recipe does), `cmp` (byte-identical files only; stops at the first differing byte).

Shapes (equal pairs, each side written by its own save: the DCP save ids differ by design):
  dcp-1g       1 GiB torch DCP pair (16 x 64 MiB tensors)
  small-20k    20,000 small tensors (1-16 KiB) in a DCP pair
  small-50k    50,000 small tensors: memory must stay flat in tensor count
  pt-names     1 GiB torch.save pair whose file names differ (a/model_a.pt vs b/model_b.pt)
  hf-sharded   1 GiB safetensors dir in 4 shards + index
  megatron     a real megatron-core torch_dist checkpoint written twice by the project's trainer
               (MegatronTrainer, seed 1234, one step, --megatron-shape, default qwen2.5-0.5b: 5.6 GB
               a side with its Adam state); --megatron-dir A,B reuses two existing run dirs
Differing pairs (dcp-1g and megatron): side B with one flipped bit in the first, the middle or the
last tensor's elements (flipped in place, restored after), against `cmp` and `compare --first`.

Rounds are interleaved (every tool once per round, the order rotated each round), so that a
neighbour's load falls on every tool alike; each figure is the median of the rounds with its
spread (min-max). Process start is included. `cmp` runs only on file pairs whose names are equal
and whose bytes are equal by design (not DCP `.metadata`, not torch.save files of other names):
where it finds them different on an equal pair, its column says so instead of a rate.
`python -c pass` runs in the same rounds: the start of this interpreter with its site (an editable
install's path finder included), which every Python command pays; the verdicts also give compare's
ratio without it, to show what is left of compare's own work.
`--front EXE` times the installed `pytest-miles` command (the C front end, setup.py: front.c; it
hands over to `pytest-miles-py` beside it) in the same rounds as `python -m pytest_miles.cli`
("compare (front)" beside "compare"): before and after on the same load.

    python benchmarks/compare_vs_tools.py [--rounds 5] [--shapes dcp-1g,...] [--dir DIR] [--front EXE]
    PYTEST_MILES_NATIVE=0 python benchmarks/compare_vs_tools.py ...   # without the native reader

Targets (issue 32): equal pairs within 1.3x of `cat` and under 64 MiB + the largest tensor; a
differing pair within 3x of `cmp` and under 128 MiB; 50,000 tensors under 64 MiB. Not run in CI.
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

SHAPES = ("dcp-1g", "small-20k", "small-50k", "pt-names", "hf-sharded", "megatron")
DIFFERING = ("dcp-1g", "megatron")
MIB = 2**20
PYSTART = "python -c pass"  # what any Python command pays to start here (this interpreter, its site): a floor


def _run(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one command; GNU time measures the RSS."""
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


def _small_state(n: int) -> dict:
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


def _write_megatron(path: Path, shape: str) -> None:
    from pytest_miles.models.embedded import SHAPES as MODEL_SHAPES
    from pytest_miles.trainers.megatron import MegatronTrainer, ModelArgs

    model = ModelArgs.qwen2(MODEL_SHAPES[shape], seq_length=32)
    MegatronTrainer(seed=1234, model=model, micro_batch_size=1, timeout=3000).train(1, save_dir=path)


def _write(shape: str, root: Path, side: str, megatron_shape: str) -> None:
    import torch

    path = root / side
    if shape == "dcp-1g":
        _dcp_save(_big_state(1.0), path)
    elif shape.startswith("small-"):
        _dcp_save(_small_state(int(shape.split("-")[1][:-1]) * 1000), path)
    elif shape == "pt-names":
        path.mkdir(parents=True)
        torch.save(_big_state(1.0), path / f"model_{side}.pt")
    elif shape == "hf-sharded":
        import json

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
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif shape == "megatron":
        _write_megatron(path, megatron_shape)


# ---- measuring ------------------------------------------------------------------------------


def _files(path: Path) -> list[Path]:
    """The files of one side: the file itself, or every file under the dir."""
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def _warm(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 * MIB):
                pass


def _cmp_pairs(a: Path, b: Path) -> list[tuple[Path, Path]]:
    """File pairs `cmp` may judge: same relative path, not a DCP `.metadata` (ids differ by design);
    two files: that pair (torch.save files of other names differ by design: said, not timed)."""
    if a.is_file() and b.is_file():
        return [(a, b)]
    rel_b = {p.relative_to(b) for p in _files(b)}
    return [(p, b / p.relative_to(a)) for p in _files(a) if p.relative_to(a) in rel_b and p.name != ".metadata"]


def _cmp_cmd(pairs: list[tuple[Path, Path]]) -> list[str]:
    """`cmp -s` over the pairs, stopping at the first that differs (exit 1), as one shell."""
    return ["sh", "-c", " && ".join(f"cmp -s '{x}' '{y}'" for x, y in pairs) or "true"]


def _rounds(tools: dict[str, list[str]], rounds: int) -> dict[str, dict]:
    """Every tool once per round, the order rotated each round: median, min, max, peak RSS, exits."""
    names = list(tools)
    got: dict[str, list[tuple[float, float, int]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            got[name].append(_run(tools[name]))
    return {n: {"s": statistics.median(t for t, _, _ in v), "min": min(t for t, _, _ in v),
                "max": max(t for t, _, _ in v), "rss": max(m for _, m, _ in v), "rc": sorted({c for *_, c in v})}
            for n, v in got.items()}


FRONT: str | None = None  # --front: the `pytest-miles` executable timed beside the Python command line


def _compare_cmd(a: Path, b: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pytest_miles.cli", "compare", str(a), str(b), *extra]


def _compare_tools(a: Path, b: Path, *extra: str) -> dict[str, list[str]]:
    """`compare` through Python, and through the front end where --front names it."""
    name = " ".join(["compare", *extra])
    tools = {name: _compare_cmd(a, b, *extra)}
    if FRONT:
        tools[f"{name} (front)"] = [FRONT, "compare", str(a), str(b), *extra]
    return tools


def bench_equal(shape: str, a: Path, b: Path, rounds: int) -> dict:
    files = _files(a) + _files(b)
    _warm(files)
    tools = {"cat": ["sh", "-c", "cat " + " ".join(f"'{f}'" for f in files) + " > /dev/null"],
             "md5sum": ["md5sum", *map(str, files)], "xxhsum": ["xxhsum", *map(str, files)],
             "cmp": _cmp_cmd(_cmp_pairs(a, b)), **_compare_tools(a, b), PYSTART: [sys.executable, "-c", "pass"]}
    if shutil.which("xxhsum") is None:  # (an absent tool "answers" in a millisecond: no column rather than a false one)
        del tools["xxhsum"]
    out = _rounds(tools, rounds)
    for name in _compare_tools(a, b):
        if out[name]["rc"] != [0]:
            sys.exit(f"{shape}: {name} did not report the pair equal (exit {out[name]['rc']})")
    if out["cmp"]["rc"] != [0]:
        out["cmp"]["note"] = "n/a: bytes differ by design (file names inside torch.save archives)"
    return {"shape": shape, "bytes": sum(f.stat().st_size for f in files), "files": len(files), "tools": out}


def _flip_positions(b: Path) -> dict[str, tuple[Path, int]]:
    """(file, byte) at the start, the middle and the end of B's tensor bytes (in file order): inside
    the elements of the first tensor, of the one holding the middle byte, of the last."""
    from pytest_miles.checks.element_diff import _chunk_ranges
    from pytest_miles.ckpt.layouts import load_layout

    spans = sorted((str(r[0]), r[1], r[2], r[0]) for e in load_layout(b).entries.values()
                   for *_, r in (_chunk_ranges(e) or []) if r[2] > 64)
    total = sum(n for _, _, n, _ in spans)
    acc, middle = 0, None
    for _, offset, n, file in spans:
        if middle is None and acc + n > total // 2:
            middle = (file, offset + total // 2 - acc)
        acc += n
    first, last = spans[0], spans[-1]
    return {"start": (first[3], first[1]), "middle": middle, "end": (last[3], last[1] + last[2] - 1)}


def _flip(file: Path, at: int) -> None:
    with open(file, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x08]))


def bench_differing(shape: str, a: Path, b: Path, rounds: int) -> list[dict]:
    rows = []
    for where, (file, at) in _flip_positions(b).items():
        _flip(file, at)
        try:
            pairs = _cmp_pairs(a, b)
            tools = {"cmp": _cmp_cmd(pairs), **_compare_tools(a, b), **_compare_tools(a, b, "--first"),
                     PYSTART: [sys.executable, "-c", "pass"]}
            out = _rounds(tools, rounds)
        finally:
            _flip(file, at)  # restored: B equals A again
        for name in [n for n in out if n.startswith("compare")]:
            if out[name]["rc"] != [1]:
                sys.exit(f"{shape} differing at {where}: {name} exit {out[name]['rc']} (1 expected)")
        rows.append({"shape": f"{shape} differing at {where}", "at": at, "file": file.name, "tools": out})
    return rows


# ---- output ---------------------------------------------------------------------------------


def _fmt(t: dict, gb: float | None = None) -> str:
    if "note" in t:
        return t["note"]
    rate = f" {gb / t['s']:5.2f} GB/s" if gb else ""
    return f"{t['s']:6.2f} s [{t['min']:.2f}-{t['max']:.2f}]{rate} {t['rss']:6.1f} MiB"


def _largest_tensor_mib(shape: str, a: Path) -> float:
    from pytest_miles.ckpt.layouts import load_layout

    return max((sum(it.length for *_, it in e.chunks) for e in load_layout(a).entries.values() if e.chunks),
               default=0) / MIB


def _verdicts(equal: list[dict], differing: list[dict], largest: dict[str, float]) -> list[str]:
    out = []
    for r in equal:
        cat = r["tools"]["cat"]
        limit = 64.0 if r["shape"] == "small-50k" else 64 + largest[r["shape"]]
        for name in [n for n in r["tools"] if n.startswith("compare")]:
            c = r["tools"][name]
            ratio = c["s"] / cat["s"]
            bare = (c["s"] - r["tools"][PYSTART]["s"]) / cat["s"]
            floor = "" if name.endswith("(front)") else f"; {bare:4.2f}x without the interpreter's start"
            out.append(f"  {r['shape']:11s} {name:17s} {ratio:4.2f}x cat {'MET' if ratio <= 1.3 else 'NOT MET'} "
                       f"(<= 1.3x{floor}); "
                       f"peak {c['rss']:.1f} MiB {'MET' if c['rss'] < limit else 'NOT MET'} (< {limit:.1f} MiB)")
    for r in differing:
        cmp_s = r["tools"]["cmp"]["s"]
        for name in [n for n in r["tools"] if n.startswith("compare")]:
            c = r["tools"][name]
            ratio = c["s"] / cmp_s
            floor = r["tools"][PYSTART]["s"] / cmp_s
            out.append(f"  {r['shape']:26s} {name:23s} {ratio:6.1f}x cmp {'MET' if ratio <= 3 else 'NOT MET'} (<= 3x; "
                       f"python -c pass alone {floor:.1f}x); "
                       f"peak {c['rss']:.1f} MiB {'MET' if c['rss'] < 128 else 'NOT MET'} (< 128 MiB)")
    return out


def _pair(shape: str, root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    if shape == "megatron" and args.megatron_dir:
        a, b = (Path(x) for x in args.megatron_dir.split(","))
        return a, b
    for side in ("a", "b"):
        subprocess.run([sys.executable, __file__, "--write", shape, "--dir", str(root), "--side", side,
                        "--megatron-shape", args.megatron_shape], check=True)
    if shape == "pt-names":
        return root / "a" / "model_a.pt", root / "b" / "model_b.pt"
    return root / "a", root / "b"


def _compile_package() -> None:
    """Byte-compile the package `compare` imports, as `pip install` does: with PYTHONDONTWRITEBYTECODE set
    and no `__pycache__` (a source checkout), every run would compile ~30 modules again (~90 ms here)."""
    import importlib.util

    spec = importlib.util.find_spec("pytest_miles")
    if spec is not None and spec.submodule_search_locations:
        for where in spec.submodule_search_locations:
            subprocess.run([sys.executable, "-m", "compileall", "-q", where], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dir", default=None, help="where to write the pairs (default: a temp dir)")
    ap.add_argument("--megatron-shape", default="qwen2.5-0.5b", help="embedded model shape the trainer trains")
    ap.add_argument("--megatron-dir", default=None, help="A,B: two existing Megatron run dirs (not written here)")
    ap.add_argument("--no-differing", action="store_true", help="equal pairs only")
    ap.add_argument("--front", default=None, metavar="EXE",
                    help="also time this `pytest-miles` executable (the C front end) in the same rounds")
    ap.add_argument("--write", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:
        _write(args.write, Path(args.dir), args.side, args.megatron_shape)
        return
    shapes = [s for s in args.shapes.split(",") if s]
    if [s for s in shapes if s not in SHAPES] or args.rounds < 1:
        sys.exit(f"--shapes: choose from {', '.join(SHAPES)}; --rounds must be >= 1")
    _compile_package()
    global FRONT
    FRONT = args.front and str(Path(args.front).resolve())
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; {args.rounds} interleaved "
          "rounds, median [min-max]; page cache warm, process start included (bytecode compiled, as an install "
          "leaves it); GB/s over both sides"
          + ("; PYTEST_MILES_NATIVE=0" if os.environ.get("PYTEST_MILES_NATIVE") == "0" else ""), flush=True)
    equal, differing, largest = [], [], {}
    for shape in shapes:
        root = Path(tempfile.mkdtemp(dir=args.dir, prefix=f"miles-bench-{shape}-"))
        try:
            a, b = _pair(shape, root, args)
            r = bench_equal(shape, a, b, args.rounds)
            equal.append(r)
            largest[shape] = _largest_tensor_mib(shape, a)
            gb = r["bytes"] / 1e9
            print(f"{shape:11s} {r['bytes'] / 2**30:5.2f} GiB in {r['files']:3d} files, largest tensor "
                  f"{largest[shape]:.1f} MiB", flush=True)
            for name, t in r["tools"].items():
                print(f"    {name:23s} {_fmt(t, gb)}", flush=True)
            if shape in DIFFERING and not args.no_differing:
                for d in bench_differing(shape, a, b, args.rounds):
                    differing.append(d)
                    print(f"{d['shape']} (byte {d['at']} of {d['file']})", flush=True)
                    for name, t in d["tools"].items():
                        print(f"    {name:23s} {_fmt(t)}", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print("targets: equal within 1.3x of cat and < 64 MiB + the largest tensor (small-50k: < 64 MiB); "
          "differing within 3x of cmp and < 128 MiB")
    print("\n".join(_verdicts(equal, differing, largest)))


if __name__ == "__main__":
    main()
