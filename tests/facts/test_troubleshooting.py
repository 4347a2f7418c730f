"""The one troubleshooting table (facts/troubleshooting.toml): a strict loader, and every user
(doctor, snapshot diagnosis, iteration walk, RL-loop comparison) rendering its rows from the file."""

from __future__ import annotations

import textwrap
import tomllib

import pytest

from pytest_miles.checks.iterations import IterationWalk
from pytest_miles.checks.loop import STAGES, Divergence
from pytest_miles.errors import InputError
from pytest_miles.facts import troubleshooting
from pytest_miles.facts.doctor import check_attention_backend, check_env_var
from pytest_miles.facts.environment import DETERMINISTIC_ENV
from pytest_miles.snapshots.store import diagnose

GOOD = """
[[row]]
id = "a"
symptom = "S"
cause = "C"
fix = "F"
stages = ["train"]
"""


def _write(tmp_path, text):
    path = tmp_path / "t.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_packaged_file_parses_and_is_shipped():
    rows = troubleshooting.rows()
    assert len({r.id for r in rows}) == len(rows) > 10
    assert troubleshooting.PACKAGED.name == "troubleshooting.toml"
    with open("pyproject.toml", "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["pytest_miles"]
    assert "facts/*.toml" in package_data


def test_good_file_reads(tmp_path):
    (row,) = troubleshooting.read_file(_write(tmp_path, GOOD))
    assert (row.id, row.arrow(), row.explained(), row.stages, row.guide) == ("a", "S -> C", "S: C", ("train",), True)


@pytest.mark.parametrize("text,message", [
    (GOOD.replace('fix = "F"\n', ""), "row 1 ('a'): field 'fix' is missing"),
    (GOOD.replace('cause = "C"', 'cause = ""'), "row 1 ('a'): field 'cause': expected a non-empty string"),
    (GOOD.replace('cause = "C"', "cause = 3"), "row 1 ('a'): field 'cause': expected a non-empty string, got 3"),
    (GOOD + 'colour = "red"\n', "row 1 ('a'): unknown field(s) colour"),
    (GOOD.replace('["train"]', '["training"]'), "row 1 ('a'): field 'stages': 'training' is not one of"),
    (GOOD.replace('["train"]', '"train"'), "row 1 ('a'): field 'stages': expected a list of non-empty strings"),
    (GOOD + 'guide = "yes"\n', "row 1 ('a'): field 'guide': expected true or false"),
    (GOOD + GOOD, "field 'id': 'a' is used by two rows"),
    (GOOD + GOOD.replace('id = "a"', 'id = "b"').replace('symptom = "S"\n', ""),
     "row 2 ('b'): field 'symptom' is missing"),
    ("[meta]\nx = 1\n", "unknown table(s) meta"),
    ("row = 1\n", "'row' must be a non-empty array of tables"),
    ("[[row]\n", "not valid TOML"),
])
def test_bad_file_names_file_row_and_field(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as exc:
        troubleshooting.read_file(path)
    assert str(exc.value).startswith(str(path)) and message in str(exc.value), str(exc.value)


def test_missing_file_and_unknown_keys(tmp_path):
    with pytest.raises(InputError, match="troubleshooting file .*: no such file"):
        troubleshooting.read_file(tmp_path / "none.toml")
    with pytest.raises(InputError, match="no row for the doctor check 'NOPE'"):
        troubleshooting.for_doctor("NOPE")
    with pytest.raises(InputError, match="divergence stage 'nope' is not one of"):
        troubleshooting.for_stage("nope")


def test_doctor_renders_its_rows_from_the_file():
    for name in DETERMINISTIC_ENV:
        row = troubleshooting.for_doctor(name)
        f = check_env_var(name, {})
        assert (f.symptom, f.fix) == (f"{row.symptom}: {row.cause}", row.fix)
        assert f"symptom: {row.symptom}: {row.cause}" in f.line() and f"fix: {row.fix}" in f.line()
    row = troubleshooting.for_doctor("sglang attention backend")
    assert check_attention_backend("torch_native").fix == row.fix


def test_snapshot_diagnosis_renders_rows_from_the_file():
    cudnn, pkgs, other = (troubleshooting.for_fingerprint(k) for k in ("cudnn", "packages.ray", "somefield"))
    assert (cudnn.id, pkgs.id, other.id) == ("cudnn-version", "package-version", "other-field")
    lines = diagnose({"cudnn": "9.19", "packages.ray": "2.1", "somefield": 1}, {})
    assert lines == [f"cuDNN 9.19 -> None ({cudnn.symptom}: {cudnn.cause})",
                     f"packages.ray 2.1 -> None ({pkgs.cause})",
                     f"somefield 1 -> None ({other.cause})"]


def test_iteration_walk_renders_rows_from_the_file():
    later = IterationWalk("a", "b", compared=[1, 2], first_diverging=2)
    first = IterationWalk("a", "b", compared=[1, 2], first_diverging=1)
    fa3, init = troubleshooting.for_stage("after_first")[0], troubleshooting.for_stage("from_first")[0]
    assert later.hint() == (f"the Miles reproducibility guide's troubleshooting: {fa3.symptom} -> {fa3.cause}; "
                            f"fix: {fa3.fix}; run `pytest-miles doctor`")
    assert first.hint().startswith(f"{init.symptom} -> {init.cause}; fix: {init.fix}")
    assert later.hint() in later.render()


def test_loop_divergence_renders_every_stage_from_the_file():
    for stage in STAGES:
        text = Divergence(3, stage, "item", "detail").render()
        for row in troubleshooting.for_stage(stage):
            assert f"{row.symptom} -> {row.cause}" in text, (stage, text)
        for row in troubleshooting.for_stage("elsewhere"):
            assert f"{row.symptom} -> {row.cause}" in text
