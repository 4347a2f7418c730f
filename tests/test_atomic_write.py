"""_files.atomic_write, the package's one atomic write: the whole new file or the old one, the
file's mode kept, no temporary left behind, and the earlier names still importable."""

from __future__ import annotations

import os
import stat

import pytest

from pytest_miles._files import atomic_write


def test_writes_str_and_bytes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "r.json"
    atomic_write(path, "first")
    assert path.read_text() == "first"
    atomic_write(path, b"\x00second")
    assert path.read_bytes() == b"\x00second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]


def test_keeps_the_mode_of_an_existing_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    os.chmod(path, 0o640)
    atomic_write(path, "new")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "new"


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        atomic_write(path, object())  # type: ignore[arg-type]  (neither str nor bytes: fails mid-write)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_earlier_names_are_the_same_function():
    from pytest_miles._files import write_atomic
    from pytest_miles.report.collector import write_atomic as collector_write_atomic

    assert write_atomic is atomic_write and collector_write_atomic is atomic_write
