"""Every dtype `torch.save` writes is read (typed storages through `_rebuild_tensor_v2`, FP8, FP4,
unsigned, bits and complex32 through `_v3`): a real `torch.save` file is EQUAL to its copy and
DIFFERENT from a file with one element's bits flipped; a DCP `.metadata` pickled at protocols 0 and
1 (Python 2 names: copy_reg) is read."""

from __future__ import annotations

import pickle

import pytest

torch = pytest.importorskip("torch")

from pytest_miles.checks.checkpoints import CheckpointError, compare_checkpoints  # noqa: E402
from pytest_miles.ckpt.lazy import ITEMSIZE  # noqa: E402
from pytest_miles.ckpt.unpickle import load_pickle  # noqa: E402

pytestmark = pytest.mark.timeout(30)

DTYPES = [d for d in ITEMSIZE if hasattr(torch, d)]


def _tensor(dtype: str, flip: bool = False):
    raw = (torch.arange(32, dtype=torch.int32) * 37 % 120 + 1).to(torch.uint8)
    if dtype == "bool":
        raw %= 2  # a bool is stored as 0 or 1
    if flip:
        raw[ITEMSIZE[dtype]] ^= 0x01  # one bit of the second element
    return raw.view(getattr(torch, dtype)).reshape(2, -1)


def test_every_dtype_torch_has_that_torch_save_writes_is_listed():
    names = {str(v).removeprefix("torch.") for v in vars(torch).values() if isinstance(v, torch.dtype)}
    missing = sorted(n for n in names - set(ITEMSIZE) if not n.startswith(("q", "int", "uint")) or n in (
        "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64"))
    assert not missing, f"dtypes torch has and the reader does not know: {missing}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_dtype_compares_equal_and_different(tmp_path, dtype):
    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    for path, flip in ((a, False), (b, False), (c, True)):
        torch.save({"w": _tensor(dtype, flip), "bias": torch.ones(2)}, path)
    assert compare_checkpoints(a, b).equal
    report = compare_checkpoints(a, c)
    assert not report.equal and [d.name for d in report.differences] == ["w"], report.render()


def test_quantized_and_sparse_tensors_are_named_not_supported(tmp_path):
    path = tmp_path / "sparse.pt"
    torch.save({"s": torch.eye(3).to_sparse()}, path)
    with pytest.raises(CheckpointError, match="sparse.pt: .*not supported: .*sparse"):
        compare_checkpoints(path, path)


class _Md:  # stands in for torch.distributed.checkpoint.metadata.Metadata when pickled
    pass


@pytest.mark.parametrize("proto", [0, 1, 2])
def test_dcp_metadata_at_old_protocols_is_read(proto):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    md = Metadata(state_dict_metadata={"step": BytesStorageMetadata()}, planner_data={"step": ("step",)})
    data = pickle.dumps(md, protocol=proto)
    assert b"copy_reg" in data or proto == 2
    out = load_pickle(data, "x/.metadata")
    assert type(out).__name__ == "Metadata" and list(out.state_dict_metadata) == ["step"]
