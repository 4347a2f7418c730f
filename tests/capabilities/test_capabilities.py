"""The capability data (loading, version ranges, user override, bad files), its verdicts in pytest
(XFAIL / XPASS(strict) / SKIP) and in plain scripts, and the `pytest-miles capabilities` CLI."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

from pytest_miles.capabilities import (
    PACKAGED,
    Capability,
    CapabilityError,
    load_capabilities,
    read_file,
)
from pytest_miles.capabilities.verdict import KnownLimitation, NotApplicable, UnexpectedPass, judge
from pytest_miles.checks.batch_invariance import InvarianceReport, Mismatch
from pytest_miles.cli import main

SUITE_SHAPE = {"seed": 0, "max_batch": 8, "prompt_len": 24}


@pytest.fixture(scope="module")
def packaged():
    return load_capabilities()


@pytest.mark.parametrize("backend,mode,version,status,cell", [
    ("flashinfer", "prefix", "0.5.17", "known_limitation", "flashinfer-prefix-random-mix"),
    ("flashinfer", "prefix", "0.5.23", "known_limitation", "flashinfer-prefix-random-mix-0.5.18+"),
    ("flashinfer", "prefix", "0.5.24", "promised", "triton-flashinfer-batch-invariance-0.5.18+"),  # outside the range
    # 0.5.9 < 0.5.17, not "0.5.9" > "0.5.17"
    ("flashinfer", "prefix", "0.5.9", "promised", "triton-flashinfer-batch-invariance"),
    ("flashinfer", "prefix", "0.5.17.post1", "known_limitation", "flashinfer-prefix-random-mix"),
    ("flashinfer", "prefix", "0.5.20.dev3+g1234abc", "known_limitation", "flashinfer-prefix-random-mix-0.5.18+"),
    ("flashinfer", "prefix_long_anchor", "0.5.17", "promised", "triton-flashinfer-batch-invariance"),
    ("triton", "prefix", "0.5.17", "promised", "triton-flashinfer-batch-invariance"),
    ("flashinfer", "radix_cache", "0.5.17", "not_applicable", "flashinfer-radix-cache-disabled"),
    ("triton", "radix_cache", "0.5.17", "promised", "triton-flashinfer-batch-invariance"),
    ("triton", "p_vs_d", "0.5.17", "known_limitation", "p_vs_d-not-promised"),
    ("fa3", "p_vs_d", "0.5.30", "known_limitation", "p_vs_d-not-promised-0.5.18+"),
    ("fa3", "single", "0.5.17", "promised", "fa3-as-documented"),
    ("fa4", "single", "0.5.17", "promised", "fa4-as-accepted"),
    ("fa4", "radix_cache", "0.5.17", "known_limitation", "fa4-mask-split-before-fix"),  # before the masking fix
    ("fa4", "radix_cache", "0.5.18", "promised", "fa4-batch-invariant-masking"),
    ("flashinfer", "radix_cache", "0.5.23", "not_applicable", "flashinfer-radix-cache-disabled-0.5.18+"),
    ("torch_native", "single", "0.5.17", "promised", None),  # no cell: promised, said so
])
def test_packaged_cells(packaged, backend, mode, version, status, cell):
    cap = packaged.lookup(backend, mode, version)
    assert cap.status == status and (cap.cell.id if cap.cell else None) == cell
    if cell is None:
        assert "no capability cell matches" in cap.describe()
    if cell in ("fa3-as-documented", "fa4-as-accepted", "fa4-batch-invariant-masking") or str(cell).endswith("0.5.18+"):
        assert "unverified" in cap.describe()


def test_known_limitation_names_reference_and_reproducing_shape(packaged):
    cap = packaged.lookup("flashinfer", "prefix", "0.5.17", SUITE_SHAPE)
    assert cap.known and cap.strict
    assert "flashinfer-ai/flashinfer/issues/2424" in cap.describe() and "2830" in cap.describe()
    assert not packaged.lookup("flashinfer", "prefix", "0.5.17", {**SUITE_SHAPE, "seed": 1}).strict
    assert not packaged.lookup("flashinfer", "prefix", "0.5.17", {**SUITE_SHAPE, "max_batch": 16}).strict
    assert packaged.lookup("triton", "p_vs_d", "0.5.17", {"seq_len": 124}).strict
    assert not packaged.lookup("triton", "p_vs_d", "0.5.17", {"seq_len": 56}).strict


def _write(tmp_path, text, name="caps.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


GOOD_CELL = """
[[cell]]
id = "mine"
versions = ">=0.5.17"
backends = ["flashinfer"]
modes = ["prefix"]
status = "promised"
"""


def test_user_file_comes_first_and_can_replace(tmp_path):
    caps = load_capabilities(_write(tmp_path, GOOD_CELL))
    assert caps.lookup("flashinfer", "prefix", "0.5.17").cell.id == "mine"
    assert caps.lookup("flashinfer", "radix_cache", "0.5.17").status == "not_applicable"  # packaged still there
    alone = load_capabilities(_write(tmp_path, "[meta]\nextends = false\n" + GOOD_CELL, "alone.toml"))
    assert alone.sources == [str(tmp_path / "alone.toml")]
    assert alone.lookup("flashinfer", "radix_cache", "0.5.17").cell is None


BAD = [
    ("[[cell]\n", "not valid TOML"),
    (GOOD_CELL + 'colour = "red"\n', "unknown field(s) colour"),
    (GOOD_CELL.replace('"promised"', '"maybe"'), "field 'status': 'maybe' is not one of promised, known_limitation"),
    (GOOD_CELL.replace('">=0.5.17"', '"from 0.5.17"'), "field 'versions': 'from 0.5.17' is not a version specifier"),
    (GOOD_CELL.replace('"promised"', '"known_limitation"'), "field 'reason' is required"),
    (GOOD_CELL.replace('"promised"', '"known_limitation"') + 'reason = "x"\n', "field 'references' is required"),
    (GOOD_CELL.replace('["prefix"]', '["prefixx"]'), "field 'modes': 'prefixx' is not one of"),
    (GOOD_CELL + "[cell.reproduces]\nbatch = 3\n", "field 'reproduces': unknown key(s) batch"),
    (GOOD_CELL + GOOD_CELL, "field 'id': 'mine' is used by two cells"),
    (GOOD_CELL.replace('modes = ["prefix"]\n', ""), "field 'modes' is missing"),
    ("[meta]\nschema = 2\n", "[meta] field 'schema': 2 is not supported"),
    ("[cells]\n", "unknown table(s) cells"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_file_names_file_and_field(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(CapabilityError) as exc:
        read_file(path)
    assert str(path) in str(exc.value) and message in str(exc.value), str(exc.value)
    if "[[cell]] #" in str(exc.value):
        assert "[[cell]] #1" in str(exc.value) or "[[cell]] #2" in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(CapabilityError, match="capability file .*: no such file"):
        read_file(tmp_path / "nope.toml")


def test_packaged_file_parses_and_is_shipped():
    cells, extends = read_file(PACKAGED)
    assert extends and {c.status for c in cells} == {"promised", "known_limitation", "not_applicable"}
    assert all(c.references for c in cells if c.status == "known_limitation")


# ---- verdicts ---------------------------------------------------------------------------------


def _report(passed: bool) -> InvarianceReport:
    report = InvarianceReport("prefix", "sglang", 1)
    if not passed:
        report.mismatches.append(Mismatch("prefix", 8, 6, "prefix95", 0, 284, 284, -0.2592, -0.2323))
    return report


def test_judge_in_scripts(packaged):
    known = packaged.lookup("flashinfer", "prefix", "0.5.17", SUITE_SHAPE)
    with pytest.raises(KnownLimitation) as exc:
        judge(_report(False), known)
    assert not isinstance(exc.value, AssertionError), "a script's `except AssertionError` must not swallow it"
    assert "https://github.com/flashinfer-ai/flashinfer/issues/2424" in exc.value.references[0]
    with pytest.raises(UnexpectedPass, match=r"XPASS\(strict\)"):
        judge(_report(True), known)
    assert issubclass(UnexpectedPass, AssertionError)
    with pytest.raises(AssertionError, match="capability: promised"):
        judge(_report(False), Capability("promised", None, True, "sglang/triton 0.5.17"))
    with pytest.raises(NotApplicable, match="radix cache off"):
        judge(_report(True), packaged.lookup("flashinfer", "radix_cache", "0.5.17"))


VERDICTS = """
import pytest
from pytest_miles import assert_batch_invariant
from pytest_miles.capabilities import load_capabilities
from pytest_miles.capabilities.verdict import judge
from pytest_miles.checks.batch_invariance import check_batch_invariance
from pytest_miles.engines.reference import ReferenceEngine

CAPS = load_capabilities({caps!r})
SHAPE = dict(seed=0, max_batch=3, prompt_len=8)

def _report(invariant):
    eng = ReferenceEngine(deterministic=invariant)
    return check_batch_invariance(eng, "single", 3, **SHAPE)

def test_known_limitation_fails():
    judge(_report(False), CAPS.lookup("flashinfer", "single", "0.5.17", {{"seed": 0}}))

def test_known_limitation_passes_where_it_reproduces():
    judge(_report(True), CAPS.lookup("flashinfer", "single", "0.5.17", {{"seed": 0}}))

def test_known_limitation_passes_elsewhere():
    judge(_report(True), CAPS.lookup("flashinfer", "single", "0.5.17", {{"seed": 1}}))

def test_promised_fails():
    judge(_report(False), CAPS.lookup("triton", "single", "0.5.17"))

def test_no_prefix_cache():
    assert_batch_invariant(ReferenceEngine(deterministic=True), "radix_cache", 2, prompt_len=8)
"""

KNOWN_SINGLE = """
[[cell]]
id = "test-known-single"
versions = ">=0.5.17"
backends = ["flashinfer"]
modes = ["single"]
status = "known_limitation"
reason = "a cause, for the test"
references = ["https://example.invalid/upstream/issue/1"]
[cell.reproduces]
seed = 0
"""


def test_verdicts_under_pytest(pytester):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    caps = pytester.path / "caps.toml"
    caps.write_text(KNOWN_SINGLE)
    pytester.makepyfile(VERDICTS.format(caps=str(caps)))
    result = pytester.runpytest_subprocess("-rfxXs", "-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(xfailed=1, failed=2, xpassed=1, skipped=1)
    out = result.stdout.str()
    assert "XFAIL test_verdicts_under_pytest.py::test_known_limitation_fails - known limitation " \
           "[test-known-single]: https://example.invalid/upstream/issue/1" in out
    assert "FAILED test_verdicts_under_pytest.py::test_known_limitation_passes_where_it_reproduces" in out
    assert "UnexpectedPass: XPASS(strict)" in out and "narrow the cell's 'versions'" in out
    assert "XPASS test_verdicts_under_pytest.py::test_known_limitation_passes_elsewhere" in out
    assert "FAILED test_verdicts_under_pytest.py::test_promised_fails" in out
    assert "SKIPPED" in out and "disable_radix_cache=true" in out and "no prefix cache" in out


def test_bad_capability_file_is_a_usage_error(pytester):
    bad = pytester.path / "bad.toml"
    bad.write_text(GOOD_CELL.replace('"promised"', '"maybe"'))
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--miles-capabilities", str(bad))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"--miles-capabilities: {bad}: [[cell]] #1 ('mine'): field 'status'" in result.stderr.str()
    pytester.makeini(f"[pytest]\nmiles_capabilities = {bad}\n")
    assert pytester.runpytest_subprocess().ret == pytest.ExitCode.USAGE_ERROR


def test_known_limitation_in_a_plain_script(tmp_path):
    """Miles runs its GPU tests as `python3 file.py`: the outcome is still distinguishable."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    caps = _write(tmp_path, KNOWN_SINGLE)
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        from pytest_miles.capabilities import load_capabilities
        from pytest_miles.capabilities.verdict import KnownLimitation, judge
        from pytest_miles.checks.batch_invariance import check_batch_invariance
        from pytest_miles.engines.reference import ReferenceEngine
        report = check_batch_invariance(ReferenceEngine(), "single", 3, max_batch=3, prompt_len=8)
        try:
            judge(report, load_capabilities({str(caps)!r}).lookup("flashinfer", "single", "0.5.17", {{"seed": 0}}))
        except KnownLimitation as exc:
            print("KNOWN", exc.references[0])
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "KNOWN https://example.invalid/upstream/issue/1" in out.stdout, out.stderr


# ---- CLI --------------------------------------------------------------------------------------


def test_cli_prints_the_table(capsys):
    assert main(["capabilities", "--sglang-version", "0.5.17"]) == 0
    out = capsys.readouterr().out
    assert "SGLang 0.5.17" in out
    line = next(x for x in out.splitlines() if x.startswith("flashinfer") and " prefix " in x)
    assert "known_limitation" in line and "flashinfer/issues/2424" in line
    assert any(x.startswith("flashinfer") and "radix_cache" in x and "not_applicable" in x for x in out.splitlines())
    assert main(["capabilities", "--sglang-version", "0.5.24", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["cells"]
    assert {(r["backend"], r["mode"]): r["status"] for r in rows}[("flashinfer", "prefix")] == "promised"


def test_cli_lists_the_other_checks_a_cell_speaks_of(capsys):
    """Beyond the batch modes: traffic, caches, sampling features, serving, per backend, only where a cell
    matches (0.5.17: the retraction cell on triton and flashinfer, the unchunked-prefill cell on flashinfer only)."""
    assert main(["capabilities", "--sglang-version", "0.5.17", "--json"]) == 0
    rows = {(r["backend"], r["mode"]): r["cell"] for r in json.loads(capsys.readouterr().out)["cells"]}
    retraction = "retracted-request-recomputed-by-prefill"
    assert rows[("triton", "retraction")] == rows[("flashinfer", "retraction")] == retraction
    assert rows[("flashinfer", "prefill_under_traffic")] == "flashinfer-prefill-under-traffic"
    assert ("triton", "prefill_under_traffic") not in rows and ("triton", "chunked_prefill") not in rows
    assert rows[("triton", "decode_kv")] == "decode-written-kv-is-not-prefill-kv"
    assert main(["capabilities", "--sglang-version", "0.5.17"]) == 0
    assert any(x.startswith("flashinfer") and " chunked_prefill " in x and "flashinfer/issues/2424" in x
               for x in capsys.readouterr().out.splitlines())


def test_cli_bad_file(tmp_path, capsys):
    bad = _write(tmp_path, "[[cell]]\nid = 1\n")
    assert main(["capabilities", "--file", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_damaged_capability_files_are_read_or_named(tmp_path):
    """Seeded: the packaged file's fields removed, added or replaced by values of every other TOML type; each
    damaged file is read (and every lookup answers) or refused with a CapabilityError naming it."""
    import random
    import tomllib

    import pytest_miles.capabilities as caps
    from tests.helpers.mutate import mutate, to_toml

    base = tomllib.loads(caps.PACKAGED.read_text())
    rng, outcomes = random.Random("capability-files"), {"read": 0, "named": 0}
    for k in range(300):
        damaged = mutate(base, rng)
        if not isinstance(damaged, dict):
            continue
        path = tmp_path / f"caps{k}.toml"
        path.write_text(to_toml(damaged))
        try:
            loaded = caps.load_capabilities(path)
            for backend in caps.BACKENDS:
                for mode in caps.CHECKS:
                    loaded.lookup(backend, mode, "0.5.17")
            caps.render_table(loaded, None)
            outcomes["read"] += 1
        except caps.CapabilityError as exc:
            assert str(path) in str(exc), str(exc)
            outcomes["named"] += 1
    assert outcomes["read"] and outcomes["named"], outcomes
