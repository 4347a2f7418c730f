"""The second side of a DCP comparison read from the first side's `.metadata` index (dcp_layout's
mirror): used only when the second `.metadata` is the first's but for the save ids, and never
changes a verdict: a difference anywhere else in `.metadata` takes the full parse, a difference in
the data is decoded from the second side's own files."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.checkpoint")

from pytest_miles.checks.checkpoints import CheckpointError, compare_checkpoints  # noqa: E402
from pytest_miles.ckpt import dcp_mirror  # noqa: E402
from pytest_miles.ckpt.layouts import load_layout  # noqa: E402
from tests.helpers.checkpoints import flip_bit, make_state, save_dcp  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two real saves of the same state to paths of the same length: ids differ, nothing else."""
    root = tmp_path_factory.mktemp("mirror")
    state = make_state(0)
    return root, save_dcp(root / "a", state, {"step": 3}), save_dcp(root / "b", state, {"step": 3}), state


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_same_metadata_but_ids_is_mirrored_and_equal(pair):
    _, a, b, _ = pair
    raw_a, raw_b = (a / ".metadata").read_bytes(), (b / ".metadata").read_bytes()
    assert raw_a != raw_b  # save_id is random per save, checkpoint_id is the path
    la = load_layout(a)
    lb = load_layout(b, like=la)
    assert lb.relocate == {a / "__0_0.distcp": b / "__0_0.distcp"}
    assert all(lb.entries[n] is e for n, e in la.entries.items())
    report = compare_checkpoints(a, b)
    assert report.passed and report.tensors_compared == len(la.entries)
    notes = "\n".join(report.notes)
    assert f"checkpoint_id={b}" in notes and f"checkpoint_id={a}" in notes  # B's ids read from B's bytes


def test_flipped_bit_in_the_second_side_is_named_with_its_own_values(pair):
    root, a, _, state = pair
    name = "decoder.layers.1.mlp.linear_fc1.weight"
    c = save_dcp(root / "c", {**state, name: flip_bit(state[name], 77, 3)}, {"step": 3})
    la = load_layout(a)
    assert load_layout(c, like=la).relocate  # still mirrored: only the data differs
    report = compare_checkpoints(a, c)
    assert [d.name for d in report.differences] == [name]
    bits = state[name].reshape(-1)[77:78].view(torch.int32).item()
    detail = report.differences[0].detail  # B's value read from B's file, not A's again
    assert "first at [1, 13]" in detail and f"(0x{bits:08x}) vs" in detail and f"(0x{bits ^ 8:08x})" in detail, detail
    report = compare_checkpoints(c, a)  # and from the other side
    assert [d.name for d in report.differences] == [name]


def test_other_metadata_bytes_take_the_full_parse(pair):
    root, a, _, state = pair
    name = "decoder.layers.0.mlp.linear_fc1.bias"
    other = save_dcp(root / "d", {**state, name: torch.zeros(4 * 64 + 1)}, {"step": 3})
    la = load_layout(a)
    assert not load_layout(other, like=la).relocate
    report = compare_checkpoints(a, other)
    assert any(d.kind == "shape" and d.name == name for d in report.differences), report.render()


def test_a_tail_edit_that_is_not_an_id_is_not_mirrored(pair, tmp_path):
    """The `.metadata` version string edited in place (same length): a metadata difference, found."""
    _, a, _, _ = pair
    e = _copy(a, tmp_path / "e")
    raw = (e / ".metadata").read_bytes()
    version = raw[raw.rfind(b"version"):]
    assert b"1.0.0" in version
    (e / ".metadata").write_bytes(raw[: len(raw) - len(version)] + version.replace(b"1.0.0", b"1.0.9"))
    assert not load_layout(e, like=load_layout(a)).relocate
    report = compare_checkpoints(a, e)
    assert [d.name for d in report.differences] == [".metadata:version"], report.render()


def test_a_fqn_edit_before_the_tail_is_not_mirrored(pair, tmp_path):
    _, a, _, _ = pair
    f = _copy(a, tmp_path / "f")
    raw = (f / ".metadata").read_bytes()
    assert raw.count(b"position_ids") >= 1
    (f / ".metadata").write_bytes(raw.replace(b"position_ids", b"position_idz"))
    report = compare_checkpoints(a, f)
    assert {d.kind for d in report.differences} == {"missing", "extra"}, report.render()


def test_truncated_second_side_is_named_as_without_the_mirror(pair, tmp_path):
    _, a, _, _ = pair
    g = _copy(a, tmp_path / "g")
    data = g / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: truncated: '.*' needs bytes up to"):
        compare_checkpoints(a, g)


def test_mirrored_ids_rules():
    """Unit rules of `mirrored_ids` on real DCP Metadata pickles (as FileSystemWriter writes them)."""
    import pickle
    from pathlib import PosixPath

    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    def raw(ckpt, save_id, version="1.0.0"):
        md = Metadata(state_dict_metadata={}, storage_data={}, storage_meta=StorageMeta(ckpt, save_id))
        md.version = version
        return pickle.dumps(md)

    ids = {"checkpoint_id": "/tmp/run/a", "save_id": "s" * 36}
    base = raw(PosixPath("/tmp/run/a"), "s" * 36)
    assert dcp_mirror.mirrored_ids(base, raw(PosixPath("/tmp/run/b"), "t" * 36), ids) == {
        "checkpoint_id": "/tmp/run/b", "save_id": "t" * 36}
    assert dcp_mirror.mirrored_ids(base, base, ids) == ids
    assert dcp_mirror.mirrored_ids(base, raw(PosixPath("/tmp/run/bb"), "t" * 35), ids) is None  # lengths
    assert dcp_mirror.mirrored_ids(base, raw(PosixPath("/tmp/run/a"), "s" * 36, "1.0.1"), ids) is None
    assert dcp_mirror.mirrored_ids(base, raw(PosixPath("/tmp/run/b"), "s" * 36),
                                    {**ids, "checkpoint_id": "/tmp/run/z"}) is None  # not A's path
    plain = raw("/tmp/run/a", "s" * 36)
    assert dcp_mirror.mirrored_ids(plain, raw("/tmp/run/b", "s" * 36), ids) == {**ids, "checkpoint_id": "/tmp/run/b"}


@pytest.mark.parametrize("piece", [5, 64, 2**20])
def test_mirrored_ids_files_answers_as_mirrored_ids(tmp_path, monkeypatch, piece):
    """The fast path's reading of two `.metadata` files (in pieces, prefixes compared natively) gives
    `mirrored_ids`'s answer for every pair: mirrored, not mirrored, the key twice, a key across a
    piece's end (pieces of 5 and 64 bytes), other lengths, other prefix bytes, a shorter tail."""
    import pickle
    from pathlib import PosixPath

    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    from pytest_miles._files import SafeFile
    from pytest_miles.ckpt.native import native_reader

    monkeypatch.setattr(dcp_mirror, "_PIECE", piece)

    def raw(ckpt, save_id, extra="x", version="1.0.0", value=None):
        md = Metadata(state_dict_metadata={extra: value}, storage_data={}, storage_meta=StorageMeta(ckpt, save_id))
        md.version = version
        return pickle.dumps(md)

    ids = {"checkpoint_id": "/tmp/run/a", "save_id": "s" * 36}
    base = raw(PosixPath("/tmp/run/a"), "s" * 36)
    others = [base, raw(PosixPath("/tmp/run/b"), "t" * 36), raw(PosixPath("/tmp/run/bb"), "t" * 35),
              raw(PosixPath("/tmp/run/a"), "s" * 36, version="1.0.1"), raw(PosixPath("/tmp/run/b"), "t" * 36, "y"),
              base[:-3], base.replace(b"Metadata", b"Metadatb")]
    twice = raw(PosixPath("/tmp/run/a"), "s" * 36, value=b"\x8c\x0cstorage_meta\x94")  # the key also in the prefix
    assert twice.count(b"\x8c\x0cstorage_meta\x94") == 2
    native = native_reader()
    for n, (a_bytes, b_bytes) in enumerate([(base, o) for o in others] + [(twice, twice)]):
        (tmp_path / f"a{n}").write_bytes(a_bytes)
        (tmp_path / f"b{n}").write_bytes(b_bytes)
        with SafeFile(tmp_path / f"a{n}") as fa, SafeFile(tmp_path / f"b{n}") as fb:
            def same_prefix(k):
                if native is not None:
                    return native.first_diff(fa.fd, 0, fb.fd, 0, k) == -1
                return fa.pread(0, k) == fb.pread(0, k)

            got = dcp_mirror.mirrored_ids_files(fa, fb, ids, same_prefix)
        assert got == dcp_mirror.mirrored_ids(a_bytes, b_bytes, ids), n
    assert dcp_mirror.mirrored_ids(base, others[1], ids) is not None  # the cases include a mirrored pair
