"""What SGLang's deterministic mode sets, per version, as data read from the released sources
([[applies]] and read_from in sglang.toml): the strict loader and the doctor's explanation."""

from __future__ import annotations

import textwrap

import pytest

from pytest_miles.capabilities import CapabilityError, load_capabilities, read_all
from pytest_miles.capabilities.deterministic_mode import doctor_findings, explain, versions_read
from pytest_miles.cli import main
from pytest_miles.errors import InputError

RELEASED = ["0.5.17", "0.5.18", "0.5.19", "0.5.20", "0.5.21", "0.5.22", "0.5.23"]


@pytest.fixture(scope="module")
def applies():
    return load_capabilities().applies


def test_every_released_version_is_read_and_every_later_cell_is_unverified_with_its_source():
    caps = load_capabilities()
    assert versions_read(caps.applies) == RELEASED
    from packaging.specifiers import SpecifierSet

    for cell in caps.cells:
        spec = SpecifierSet(cell.versions)
        if not spec.contains("0.5.17") and spec.contains("0.5.18"):
            assert not cell.verified and cell.read_from, cell.id
    for a in caps.applies:
        assert not a.verified and a.read_from, a.id


def _text(applies, version, backend=None) -> str:
    return "\n".join(f"{t}: {x}" for t, x in explain(applies, version, backend))


def test_tp_settings_with_file_and_line(applies):
    old, new = _text(applies, "0.5.17"), _text(applies, "0.5.23")
    for text in (old, new):
        assert "NCCL_ALGO=allreduce:tree" in text and "disable_custom_all_reduce=True" in text
    assert "sglang/srt/server_args.py:7881" in old and "sglang/srt/arg_groups/attention_hook.py:676" in new
    assert "SGLANG_DETERMINISTIC_NCCL_NCHANNELS" not in old and "enable_torch_symm_mem" not in old
    assert "NCCL_MIN_NCHANNELS=NCCL_MAX_NCHANNELS=SGLANG_DETERMINISTIC_NCCL_NCHANNELS (default 8)" in new
    assert "sglang/srt/environ.py:1531" in new and "attention_hook.py:697" in new


def test_backend_differences_between_versions(applies):
    assert "fa4-batch-invariant-masking" not in _text(applies, "0.5.17", "fa4")
    fa4 = _text(applies, "0.5.23", "fa4")
    assert "set_batch_invariant(True)" in fa4 and "sglang/pull/33417" in fa4
    assert "SGLANG_TRITON_PREFILL_TRUNCATION_ALIGN_SIZE" in _text(applies, "0.5.21", "triton")
    assert "no chunk alignment for triton" in _text(applies, "0.5.22", "triton")
    flashinfer = _text(applies, "0.5.23", "flashinfer")
    assert "disable_radix_cache=True" in flashinfer and "radix cache left on" not in flashinfer
    assert "issues/15481" in flashinfer and "pull/38140" in flashinfer


def _doctor(capsys, *args) -> str:
    assert main(["doctor", "--gpu-class", "none", *args]) in (0, 1)
    return capsys.readouterr().out


def test_doctor_explains_017_and_023_differently(capsys):
    old = _doctor(capsys, "--sglang-version", "0.5.17", "--attention-backend", "triton")
    new = _doctor(capsys, "--sglang-version", "0.5.23", "--attention-backend", "triton")
    assert "[INFO] sglang 0.5.17 deterministic mode: tp_allreduce" in old
    assert "NCCL_ALGO=allreduce:tree" in old and "NCCL_ALGO=allreduce:tree" in new
    assert "NCCL_MIN_NCHANNELS" in new and "NCCL_MIN_NCHANNELS" not in old
    assert "SGLANG_TRITON_PREFILL_TRUNCATION_ALIGN_SIZE" in old and "no chunk alignment for triton" in new
    assert "[unverified: read from the released source]" in new
    summary = [x for x in new.splitlines() if x.startswith("doctor: ")]
    assert summary and "INFO" not in summary[0]  # explanations are not counted as checks


def test_doctor_refuses_a_version_the_data_was_not_read_from(capsys, applies):
    assert main(["doctor", "--gpu-class", "none", "--sglang-version", "0.5.9"]) == 2
    err = capsys.readouterr().err
    assert "--sglang-version: '0.5.9'" in err and "accepted: 0.5.17, 0.5.18" in err and "0.5.23" in err
    with pytest.raises(InputError):
        doctor_findings(applies, "0.6.0", None, given=True)
    outside = doctor_findings(applies, "0.6.0", None, given=False)  # installed, newer than the data
    assert outside[0].status == "skip" and "outside the versions" in outside[0].detail
    assert doctor_findings(applies, None, None, given=False)[0].status == "skip"


GOOD = """
[[applies]]
id = "mine"
versions = ">=0.5.18"
backends = ["*"]
feature = "tp_allreduce"
sets = ["NCCL_ALGO=allreduce:tree"]
why = "because"
read_from = ["0.5.18 sglang/srt/server_args.py:8270"]
"""
CELL = """
[[cell]]
id = "c"
versions = ">=0.5.18"
backends = ["fa4"]
modes = ["single"]
status = "promised"
"""

BAD = [
    (GOOD.replace('"tp_allreduce"', '"tp"'), "[[applies]] #1 ('mine'): field 'feature': 'tp' is not one of"),
    (GOOD.replace("server_args.py:8270", "server_args.py"), "[[applies]] #1 ('mine'): field 'read_from': "
     "'0.5.18 sglang/srt/server_args.py' is not 'VERSION sglang/PATH.py:LINE'"),
    (GOOD.replace('"0.5.18 sglang', '"0.5.17 sglang'), "field 'read_from': '0.5.17 sglang/srt/server_args.py:8270' "
     "names version 0.5.17, outside this entry's versions '>=0.5.18'"),
    (GOOD.replace('read_from = ["0.5.18 sglang/srt/server_args.py:8270"]\n', ""), "field 'read_from' is required"),
    (GOOD + 'colour = "red"\n', "unknown field(s) colour"),
    (GOOD.replace('why = "because"\n', ""), "field 'why' is missing"),
    (GOOD + "verified = true\n", "field 'verified': expected a string"),
    (GOOD + GOOD, "'mine' is used by two entries"),
    (CELL + 'read_from = ["0.5.18 sglang/x.py:0"]\n', "[[cell]] #1 ('c'): field 'read_from': '0.5.18 sglang/x.py:0'"),
    (CELL + 'read_from = ["0.5.17 sglang/x.py:3"]\n', "[[cell]] #1 ('c'): field 'read_from': '0.5.17 sglang/x.py:3' "
     "names version 0.5.17, outside"),
    (CELL + 'verified = true\nread_from = ["0.5.18 sglang/x.py:3"]\n', "[[cell]] #1 ('c'): field 'verified': true"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_loader_rejects_a_bad_entry_naming_file_entry_and_field(tmp_path, text, message):
    path = tmp_path / "caps.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(CapabilityError) as exc:
        read_all(path)
    assert str(path) in str(exc.value) and message in str(exc.value), str(exc.value)


def test_a_good_user_entry_comes_first(tmp_path):
    path = tmp_path / "caps.toml"
    path.write_text(GOOD + CELL + 'read_from = ["0.5.18 sglang/x.py:3"]\n')
    cells, _, entries = read_all(path)
    assert cells[0].read_from == ("0.5.18 sglang/x.py:3",) and entries[0].id == "mine"
    caps = load_capabilities(path)
    assert caps.applies[0].id == "mine" and len(caps.applies) > 1
