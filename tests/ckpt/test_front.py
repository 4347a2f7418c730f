"""The `pytest-miles` command in C (pytest_miles/ckpt/dcpscan/front.c), against the Python command line.

What must hold: wherever the C command answers (`compare` of two equal plain DCP dirs, and
`compare --first` of a differing pair of one data file where first.c is sure), it prints what
`python -m pytest_miles.cli` prints (all but the seconds and GB/s) with the same exit code;
everything else (other differing pairs, other formats, flags it does not know, malformed and hostile
files, every other subcommand) is handed over to the Python command line with the arguments
untouched, so that the outputs are Python's own. Files are never written and payloads never run.

The executable is built as an install builds it (`setup.py build_scripts`), into a temp dir; the
Python command line beside it (`pytest-miles-py`, a console script in an install) is here a shell
script that notes each hand-over in a log, then runs this checkout's real CLI.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pytest_miles.checks import dcp_fast  # noqa: E402
from tests.ckpt.test_checkpoints_hostile import CASES, world  # noqa: E402, F401  (the hostile files, reused)
from tests.ckpt.test_dcp_native import _copy, _malformed  # noqa: E402
from tests.helpers.checkpoints import save_dcp, tree_state  # noqa: E402

ROOT = Path(__file__).parent.parent.parent
pytestmark = pytest.mark.skipif(dcp_fast.native_reader() is None or shutil.which("cc") is None,
                                reason="no C compiler: `pytest-miles` is the shell script that starts Python")


@pytest.fixture(scope="module")
def front(tmp_path_factory) -> Path:
    """`pytest-miles` built by setup.py as an install builds it, with a logging `pytest-miles-py` beside it."""
    bin_dir = tmp_path_factory.mktemp("front-bin")
    exe = bin_dir / "pytest-miles"
    if os.environ.get("FRONT_SANITIZE"):  # by hand: FRONT_SANITIZE=1 ASAN_OPTIONS=detect_leaks=0 pytest this file
        src = ROOT / "pytest_miles" / "ckpt" / "dcpscan"
        subprocess.run(["cc", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                        "-DDCPSCAN_NO_PYTHON", "-pthread", "-o", str(exe), *(str(src / f) for f in
                                                                         ("front.c", "first.c", "vm.c", "walk.c")),
                        "-lm"], check=True)
    else:
        subprocess.run([sys.executable, "setup.py", "-q", "build_scripts", "--build-dir", str(bin_dir), "--force"],
                       cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert exe.read_bytes()[:4] == b"\x7fELF", "setup.py installed the shell script: front.c was not compiled"
    cli = bin_dir / "pytest-miles-py"
    cli.write_text(f'#!/bin/sh\necho "${{_PYTEST_MILES_FAST_DECLINED:-}}|$*" >> "$FRONT_TEST_LOG"\n'
                   f'exec {sys.executable} -m pytest_miles.cli "$@"\n')
    cli.chmod(0o755)
    return exe


def _env(log: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_MILES_")}
    return {**env, "PYTHONPATH": str(ROOT), "FRONT_TEST_LOG": str(log), **extra}


def _in_process(args: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m pytest_miles.cli ARGS` run in this process (its `main`, under `env`, stdout and stderr caught):
    the same code without starting Python and importing torch again, for tests that compare many runs."""
    import contextlib
    import io

    from pytest_miles.cli import main

    out, err, saved = io.StringIO(), io.StringIO(), dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["pytest_miles.cli", *args], rc, out.getvalue(), err.getvalue())


def _both(front: Path, tmp_path: Path, *args: str, figures: bool = True, in_process: bool = False,
          **env: str) -> tuple[subprocess.CompletedProcess, bool | str]:
    """Run `pytest-miles ARGS` (the C command) and `python -m pytest_miles.cli ARGS`; check they agree
    (stdout but the seconds and GB/s, stderr, exit code); return the C command's run and whether it
    handed over to Python: False, True, or "fast path declined" (it told Python that the bytes or
    plans differ: Python skipped its own fast path, and still printed what it prints without).
    `figures=False`: the "compared N items, X MiB" line is left out too (where Python's own count
    depends on which of its threads stops first: several groups of one file under --first).
    `in_process=True`: the Python side runs in this process (`_in_process`), for loops of many runs."""
    log = tmp_path / "handed-over.log"
    log.unlink(missing_ok=True)
    ours = subprocess.run([str(front), *args], capture_output=True, text=True, env=_env(log, **env), timeout=120)
    ref = (_in_process(args, _env(log.with_suffix(".ref"), **env)) if in_process else
           subprocess.run([sys.executable, "-m", "pytest_miles.cli", *args], capture_output=True, text=True,
                          env=_env(log.with_suffix(".ref"), **env), timeout=120))
    def untimed(out: str) -> list[str]:
        lines = [re.sub(r" in [0-9.]+ s \([0-9.]+ GB/s\)$", "", line) for line in out.splitlines()
                 if '"seconds": ' not in line]
        return [line for line in lines if figures or not line.startswith("  compared ")]

    assert untimed(ours.stdout) == untimed(ref.stdout), (args, ours.stdout, ref.stdout)
    assert (ours.returncode, ours.stderr) == (ref.returncode, ref.stderr), (args, ours, ref)
    if not log.exists():
        return ours, False
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and lines[0].split("|", 1)[1] == " ".join(args)  # the arguments reached Python untouched
    return ours, "fast path declined" if lines[0].startswith("1|") else True


@pytest.fixture(scope="module")
def pairs(dcp_pairs) -> dict[str, tuple[Path, Path]]:
    """Equal pairs of real saves (each side its own save: its own save_id and path), as test_dcp_native's:
    the same ones (`dcp_pairs`, tests/ckpt/conftest.py)."""
    return dcp_pairs


@pytest.mark.parametrize("name", ["plain", "adamw", "many", "fsdp2-sharded", "dtensor-replicated"])
def test_equal_dcp_pairs_are_answered_natively_with_the_python_report(front, pairs, name, tmp_path):
    a, b = pairs[name]
    before = tree_state(a) | tree_state(b)
    for flags in ([], ["--first"], ["--workers", "1"], ["--workers=3", "--first"]):
        run, handed = _both(front, tmp_path, "compare", *flags, str(a), str(b))
        assert run.returncode == 0 and run.stdout.startswith("checkpoints EQUAL") and not handed, (name, flags)
    run, handed = _both(front, tmp_path, "compare", str(b), str(a))  # either order
    assert run.returncode == 0 and not handed
    run, handed = _both(front, tmp_path, "compare", str(a), str(a))  # a dir against itself: one ids note
    assert run.returncode == 0 and not handed
    assert tree_state(a) | tree_state(b) == before
    if name == "plain":  # the same json/txt/yaml files beside on both sides
        sa, sb = _copy(a, tmp_path / "side-a"), _copy(b, tmp_path / "side-b")
        for d in (sa, sb):
            (d / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
            (d / "notes.txt").write_text("x")
        run, handed = _both(front, tmp_path, "compare", str(sa), str(sb))
        assert run.returncode == 0 and not handed
        (sb / "notes.txt").write_text("y")
        run, handed = _both(front, tmp_path, "compare", str(sa), str(sb))
        assert handed is True


def test_second_side_read_in_full_when_its_metadata_is_not_the_firsts(front, pairs, tmp_path):
    """B's `.metadata` written again by pickle (other bytes, same objects): no mirror, B is scanned."""
    import pickle

    a, b = pairs["plain"]
    other = _copy(b, tmp_path / "repickled")
    md = pickle.loads((other / ".metadata").read_bytes())  # our own file: trusted here
    md.storage_meta.save_id = "x" * 7  # another length too
    (other / ".metadata").write_bytes(pickle.dumps(md))  # file sizes differ: B is not A's mirror
    run, handed = _both(front, tmp_path, "compare", str(a), str(other))
    assert run.returncode == 0 and not handed and "save_id=xxxxxxx" in run.stdout


# what Python says of one flipped byte: at 0, in an item's torch.save container (an error); in the
# middle, in a float32 value (DIFFERENT); the last byte, padding of a zip container (EQUAL, with a note)
@pytest.mark.parametrize(("where", "rc"), [("start", 2), ("middle", 1), ("end", 0)])
def test_a_pair_whose_bytes_differ_is_python_s_report(front, pairs, where, rc, tmp_path):
    a, b = pairs["plain"]
    flipped = _copy(b, tmp_path / "flipped")
    data = flipped / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[{"start": 0, "middle": len(raw) // 2, "end": len(raw) - 1}[where]] ^= 1
    data.write_bytes(bytes(raw))
    for flags in ([], ["--first"]):
        run, handed = _both(front, tmp_path, "compare", *flags, str(a), str(flipped))
        # --first of a flipped value: answered natively (first.c); in the container or the padding: Python's
        native = flags == ["--first"] and where == "middle"
        assert run.returncode == rc and handed == (False if native else "fast path declined"), (flags, where)


# --first on a differing pair: the first differing element of the first differing tensor alone
# ("--first: the rest not compared"), values as Python's repr prints them (exponent notation, -0.0,
# nan, inf); the C command answers these itself (first.c: one data file), with Python's report
FIRST_CASES = {  # dtype: (A's values, index changed, B's value there)
    "float32": ([1.5, 1e-20, 3e20, 0.0, 2.0], 3, -0.0),
    "bfloat16": ([1.0, 2.5e-5, 1e30, 7.0], 2, float("inf")),
    "float16": ([0.1, 6e-5, 65504.0], 1, float("nan")),
    "float64": ([0.1, 1e16, 1e-5, 123456789.0], 1, 1.0000000000000002e16),
    "int64": ([1, -5, 2**62], 2, -(2**62)),
    "int8": ([1, -5, 7], 0, -128),
    "uint8": ([1, 5, 255], 2, 0),
    "int32": ([1, -(2**31), 2**31 - 1], 0, -1),
    "int16": ([3, -32768, 32767], 2, -32768),
    "bool": ([False, False, True], 0, True),
}


@pytest.mark.parametrize("dtype", list(FIRST_CASES))
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_first_on_a_differing_pair_names_the_first_element_alone(front, dtype, where, tmp_path):
    values, k, changed = FIRST_CASES[dtype]
    dt = getattr(torch, dtype)
    n = 4096
    base = torch.tensor(values * (n // len(values)) + values[: n % len(values)], dtype=torch.float64).to(dt)
    state = {"first": torch.ones(16), "w": base.reshape(64, 64), "last": torch.arange(8).to(dt)}
    flat = {"start": k, "middle": n // 2 - n // 2 % len(values) + k, "end": n - len(values) + k}[where]
    other = {key: t.clone() for key, t in state.items()}
    other["w"].view(-1)[flat] = torch.tensor(changed, dtype=torch.float64).to(dt)
    a, b = save_dcp(tmp_path / "a", state), save_dcp(tmp_path / "b", other)
    run, handed = _both(front, tmp_path, "compare", "--first", str(a), str(b))
    assert run.returncode == 1 and handed is False  # answered by first.c, Python's report to the byte
    line = next(x for x in run.stdout.splitlines() if x.startswith("  - [tensor] w: "))
    assert line.startswith(f"  - [tensor] w: first differing element at [{flat // 64}, {flat % 64}] ({dtype}, shape")
    assert line.endswith("; --first: the rest not compared") and "elements differ" not in line
    assert "(stopped at the first difference: --first)" in run.stdout
    run, _ = _both(front, tmp_path, "compare", str(a), str(b))  # without --first: the full count, as before
    assert run.returncode == 1 and "w: 1 of 4096 elements differ" in run.stdout


# values whose repr is easy to get wrong: the switch to exponent notation (1e16, 1e-4), the shortest
# digits that read back, subnormals, float16 and bfloat16 widened to double, NaN payloads, -0.0
REPR_CASES = [
    ("float64", 1e16, 9999999999999998.0), ("float64", 0.0001, 9.999999999999999e-05),
    ("float64", 1e-05, 0.00010000000000000002), ("float64", 5e-324, -5e-324), ("float64", 1.7976931348623157e308, 0.1),
    ("float64", 123456789012345.6, 1234567890123456.8), ("float32", 1e-45, 3.4028234663852886e38),
    ("float32", 0.1, 16777217.0), ("float16", 6e-08, -65504.0), ("float16", 0.000123, 1e-4),
    ("bfloat16", 1e-38, -3e38), ("bfloat16", 0.0, float("-inf")),
]


@pytest.mark.parametrize(("dtype", "va", "vb"), REPR_CASES)
def test_first_values_are_printed_as_python_prints_them(front, dtype, va, vb, tmp_path):
    dt = getattr(torch, dtype)
    a = {"x": torch.tensor([va, 1.0, va], dtype=torch.float64).to(dt)}
    b = {"x": torch.tensor([va, 1.0, vb], dtype=torch.float64).to(dt)}
    if dtype == "float32" and va == 0.1:  # a NaN with a payload against a quiet NaN
        a["x"] = torch.tensor([1, 2, 0x7FC00001], dtype=torch.int32).view(torch.float32)
        b["x"] = torch.tensor([1, 2, 0x7FC00000], dtype=torch.int32).view(torch.float32)
    pa, pb = save_dcp(tmp_path / "a", a), save_dcp(tmp_path / "b", b)
    run, handed = _both(front, tmp_path, "compare", "--first", str(pa), str(pb))
    assert run.returncode == 1 and handed is False and "x: first differing element at [2]" in run.stdout


@pytest.mark.parametrize("workers", ["1", "2", "3"])
def test_first_in_a_file_read_by_several_threads(front, workers, tmp_path):
    """Over 16 MiB in one data file: Python cuts it into one group a worker; the C command names what it
    names (the differing tensor precedes every later item) at the start and in the middle. The count of
    compared items is Python's own only with one worker (with more, it depends on which thread stops
    first); checked there."""
    state = {f"t{i}": torch.full((2**20,), float(i)) for i in range(6)}  # 6 x 4 MiB, in file order
    a = save_dcp(tmp_path / "a", state)
    for where, (name, k) in {"start": ("t0", 0), "middle": ("t3", 5000), "end": ("t5", 2**20 - 1)}.items():
        other = {key: t.clone() for key, t in state.items()}
        other[name][k] = -1.0
        b = save_dcp(tmp_path / f"b-{where}", other)
        run, handed = _both(front, tmp_path, "compare", "--first", "--workers", workers, str(a), str(b),
                            figures=workers == "1")
        assert run.returncode == 1 and handed is False, (where, run)
        assert f"first differing element at [{k}]" in run.stdout


def test_first_hands_over_where_a_later_item_belongs_to_an_earlier_entry(front, tmp_path):
    """`.metadata` listing the entries in the other order than the file holds them (re-pickled: our own
    files): a difference in the file's first item, whose entry comes second, is handed over (Python names
    the first in checkpoint order of what its threads found); one in the file's second item, whose entry
    comes first and has nothing after it, is answered natively."""
    import pickle

    state = {"a": torch.arange(64, dtype=torch.float32), "b": torch.arange(64, dtype=torch.float32) * 2}
    for where, (name, native) in {"first-in-file": ("a", False), "second-in-file": ("b", True)}.items():
        other = {key: t.clone() for key, t in state.items()}
        other[name][5] = -1.0
        sides = [save_dcp(tmp_path / f"{where}-a", state), save_dcp(tmp_path / f"{where}-b", other)]
        for d in sides:
            md = pickle.loads((d / ".metadata").read_bytes())  # our own file: trusted here
            md.state_dict_metadata = dict(reversed(list(md.state_dict_metadata.items())))
            (d / ".metadata").write_bytes(pickle.dumps(md))
        run, handed = _both(front, tmp_path, "compare", "--first", *map(str, sides))
        assert run.returncode == 1 and f"  - [tensor] {name}: first differing element at [5]" in run.stdout
        assert handed == (False if native else "fast path declined"), where


def _first_blob(d: Path) -> tuple[int, int]:
    """(offset, length) of the first item of the one data file: a torch.save blob."""
    from pytest_miles.ckpt.layouts import load_layout

    items = sorted((it.offset, it.length) for e in load_layout(d).entries.values() for *_, it in e.chunks)
    return items[0]


def test_damaged_blobs_are_never_answered_differently(front, tmp_path):
    """The differing tensor's torch.save blob damaged alike on both sides (its zip directory, end records,
    local headers, pickle), one of its values flipped in B: wherever the C command still answers, it must
    print what Python prints; elsewhere it hands over (Python's error or Python's report)."""
    import random

    state = {"w": torch.linspace(-1, 1, 256).reshape(16, 16), "v": torch.ones(4)}
    a0 = save_dcp(tmp_path / "orig", state)
    off, length = _first_blob(a0)
    raw = bytearray((a0 / "__0_0.distcp").read_bytes())
    blob = bytes(raw[off:off + length])
    value_at = off + blob.index(torch.linspace(-1, 1, 256)[:4].numpy().tobytes()) + 4 * 37
    rng = random.Random(32)
    answered = handed = 0
    for k in range(60):
        data = bytearray(raw)
        for _ in range(rng.choice((1, 1, 2))):
            at = off + (rng.randrange(length - 160, length) if k % 3 == 0 else rng.randrange(0, 240) if k % 3 == 1
                        else rng.randrange(length))
            if at in range(value_at, value_at + 4):
                continue
            data[at] = rng.choice((rng.randrange(256), data[at] ^ 1, data[at] ^ 0x80, 0, 0xFF))
        a, b = _copy(a0, tmp_path / f"a{k}"), _copy(a0, tmp_path / f"b{k}")
        (a / "__0_0.distcp").write_bytes(bytes(data))
        data[value_at] ^= 0x40
        (b / "__0_0.distcp").write_bytes(bytes(data))
        run, how = _both(front, tmp_path, "compare", "--first", str(a), str(b), in_process=True)
        answered += how is False
        handed += how is not False
        shutil.rmtree(a)
        shutil.rmtree(b)
    assert answered and handed, (answered, handed)  # both outcomes were exercised


def test_first_on_chunked_tensors_names_the_first_element_in_row_major_order(front, pairs, tmp_path):
    """FSDP2-sharded saves (each tensor in chunks, two .distcp files): --first reads each chunk up to its
    first differing byte and names the element first in the tensor's row-major order, as the full report."""
    from pytest_miles.checks.element_diff import _chunk_ranges
    from pytest_miles.ckpt.layouts import load_layout

    a, b = pairs["fsdp2-sharded"]
    entries = load_layout(b).entries
    name, ranges = next((n, r) for n, e in entries.items() if (r := _chunk_ranges(e)) is not None and len(r) > 1)
    size = ranges[0][2][2] // math.prod(ranges[0][1])
    for flips in ([(1, 0)], [(1, 0), (0, -1)]):  # (chunk, element): the second chunk's first, then the first's last too
        flipped = _copy(b, tmp_path / f"flipped-{len(flips)}")
        for c, k in flips:
            rel = Path(ranges[c][2][0]).relative_to(b)
            at = ranges[c][2][1] + (k % (ranges[c][2][2] // size)) * size + size - 1
            raw = bytearray((flipped / rel).read_bytes())
            raw[at] ^= 0x40
            (flipped / rel).write_bytes(bytes(raw))
        # two .distcp files: both runs are Python's, whose "compared N items" under --first counts what its
        # threads (one per file) finished before the stop, which differs from run to run (CI, 2026-12-04)
        run, handed = _both(front, tmp_path, "compare", "--first", str(a), str(flipped), figures=False)
        assert run.returncode == 1 and handed == "fast path declined"
        full, _ = _both(front, tmp_path, "compare", str(a), str(flipped))
        line = next(x for x in run.stdout.splitlines() if x.startswith(f"  - [tensor] {name}: first differing"))
        full_line = next(x for x in full.stdout.splitlines() if x.startswith(f"  - [tensor] {name}: "))
        assert f"{len(flips)} of " in full_line
        # the same element, values and bits as the full report's "first at [...]: ..."
        assert line.split("]): ", 1)[1].split("; --first")[0] == full_line.split("first at [", 1)[1].split("]: ", 1)[
            1].split("; max")[0]
        assert line.split("first differing element at [", 1)[1].split("]")[0] == full_line.split("first at [", 1)[
            1].split("]")[0]


def test_what_it_does_not_answer_goes_to_python_untouched(front, pairs, tmp_path):
    a, b = pairs["plain"]
    common = _copy(b, tmp_path / "with-common")  # a torch file beside: Python reads it
    torch.save({"args": {"seed": 0}}, common / "common.pt")
    _copy(a, tmp_path / "with-common-a")
    torch.save({"args": {"seed": 0}}, tmp_path / "with-common-a" / "common.pt")
    extra = _copy(b, tmp_path / "extra")
    (extra / "notes.md").write_text("x")
    side = _copy(b, tmp_path / "side-json")
    (side / "metadata.json").write_text("{}")
    odd = _copy(a, tmp_path / "caf\u00e9")
    cases = [  # the exit codes are Python's (checked equal by _both)
        ["compare", "--json", str(a), str(b)], ["compare", "--ignore", "*bias*", str(a), str(b)],
        ["compare", "--iterations", "all", str(a), str(b)], ["compare", "--fir", str(a), str(b)],
        ["compare", "--workers", "0", str(a), str(b)], ["compare", "--workers", "01", str(a), str(b)],
        ["compare", "--debug", str(a), str(b)], ["compare", str(a)], ["compare", str(a), str(b), str(a)],
        ["compare", "--", str(a), str(b)], ["compare", str(tmp_path / "with-common-a"), str(common)],
        ["compare", str(a), str(extra)], ["compare", str(a), str(side)], ["compare", str(odd), str(b)],
        ["compare", str(a), str(ROOT / "no-such-dir")], ["compare", str(a), "manifest.json"],
    ]
    for args in cases:
        run, handed = _both(front, tmp_path, *args)
        assert handed, (args, run)
    for env in ({"PYTEST_MILES_NATIVE": "0"}, {"PYTEST_MILES_NATIVE": "maybe"}, {"PYTHONIOENCODING": "utf-8"}):
        run, handed = _both(front, tmp_path, "compare", str(a), str(b), **env)
        assert handed, env


def test_other_subcommands_go_to_python(front, tmp_path):
    for args in (["--help"], ["--version"], [], ["compare", "--help"], ["suite", "--version"],
                 ["matrix", "--gpu", "h100"], ["fingerprint", "--gpu-class", "none"], ["no-such-command"]):
        run, handed = _both(front, tmp_path, *args)
        assert handed, args
    run, _ = _both(front, tmp_path, "suite", "--version")
    assert "pytest" in run.stdout + run.stderr  # pytest's own answer: `suite` reached pytest


def test_malformed_metadata_is_python_s_error(front, pairs, tmp_path):
    cases = _malformed(pairs["plain"][0], tmp_path)
    for name, bad in cases.items():
        twin = _copy(bad, tmp_path / f"{bad.name}-twin")
        before = tree_state(bad) | tree_state(twin)
        run, handed = _both(front, tmp_path, "compare", str(bad), str(twin))
        assert handed and run.returncode == 2, (name, run)
        assert tree_state(bad) | tree_state(twin) == before, name
    assert not (tmp_path / "PAYLOAD-RAN").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [c for c in CASES if c.startswith(("payload", "FIFO", "socket", "symlink", "empty"))
                                  or "metadata" in c or "distcp" in c or "DCP" in c])
def test_hostile_files_are_python_s_error_never_a_hang(front, world, case, tmp_path):  # noqa: F811
    t, marker, cases = world
    good, bad, text = cases[case]
    before = tree_state(t)
    run, handed = _both(front, tmp_path, "compare", str(good), str(bad))
    assert handed and run.returncode == 2 and text in run.stderr, (case, run)
    assert not marker.exists(), "a pickle payload ran"
    assert tree_state(t) == before, "inputs must never be written"


def test_mutated_metadata_tails_are_never_vouched_for_wrongly(front, pairs, tmp_path):
    """The mirror check reads B's `.metadata` tail (from the `storage_meta` key on: the save ids) with its own
    opcode reader. Random byte changes there (and a few before it): wherever the C command still answers, it
    must print what Python prints; elsewhere it hands over. (FRONT_SANITIZE=1: under ASan and UBSan.)"""
    import random

    a, b = pairs["plain"]
    quiet = tmp_path / "bin"  # the same executable, beside a `pytest-miles-py` that only says it was reached
    quiet.mkdir()
    shutil.copy2(front, quiet / "pytest-miles")
    (quiet / "pytest-miles-py").write_text("#!/bin/sh\nexit 99\n")
    (quiet / "pytest-miles-py").chmod(0o755)
    raw = (b / ".metadata").read_bytes()
    start = raw.find(b"\x8c\x0cstorage_meta\x94")
    assert 0 < start and len(raw) - start < 4096
    rng = random.Random(32)
    answered = handed = 0
    mutant = _copy(b, tmp_path / "mutant")
    for k in range(300):
        data = bytearray(raw)
        for _ in range(rng.choice((1, 1, 2, 3))):
            at = rng.randrange(start, len(raw)) if k % 10 else rng.randrange(len(raw))
            data[at] = rng.choice((rng.randrange(256), data[at] ^ 1, ord("x"), 0x8C, 0x94, 0x2E))
        (mutant / ".metadata").write_bytes(bytes(data))
        run = subprocess.run([str(quiet / "pytest-miles"), "compare", str(a), str(mutant)], capture_output=True,
                             text=True, env=_env(tmp_path / "unused.log"), timeout=60)
        if run.returncode == 99:
            handed += 1
            continue
        assert run.returncode == 0 and not run.stderr, (k, run)
        answered += 1
        _both(front, tmp_path, "compare", str(a), str(mutant))  # the same report as Python's
    assert answered and handed, (answered, handed)  # both outcomes were exercised
