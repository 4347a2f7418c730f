"""Pickles bounded in time and memory: shared references walked once (a DAG pickle answered in
under 2 s), memo indices bounded by the file's size (no allocation from a 10-byte file), objects of
classes outside the allow-list refused by name; each case under a per-case time limit."""

from __future__ import annotations

import pickle
import resource
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pytest_miles.checks.checkpoints import CheckpointError, compare_checkpoints  # noqa: E402
from pytest_miles.ckpt.unpickle import load_pickle  # noqa: E402

pytestmark = pytest.mark.timeout(20)


def _dag(levels: int = 40) -> list:
    x: list = [1.5]
    for _ in range(levels):
        x = [x, x]
    return x


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("levels", [40, 150])
def test_a_dag_torch_file_is_compared_in_linear_time(tmp_path, levels):
    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    torch.save({"w": torch.ones(2), "dag": _dag(levels)}, a)
    torch.save({"w": torch.ones(2), "dag": _dag(levels)}, b)
    other = _dag(levels)
    other[1] = [other[1][0], [2.5]]  # one shared reference broken: a different object graph
    torch.save({"w": torch.ones(2), "dag": other}, c)
    assert a.stat().st_size < 20_000
    t0 = time.monotonic()
    assert compare_checkpoints(a, b).equal
    assert not compare_checkpoints(a, c).equal
    assert time.monotonic() - t0 < 2


def test_a_cycle_is_compared_not_walked_forever(tmp_path):
    x: list = [1]
    x.append(x)
    torch.save({"cycle": x}, tmp_path / "a.pt")
    torch.save({"cycle": x}, tmp_path / "b.pt")
    assert compare_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt").equal


MEMO = {  # hostile memo indices: each asks the C unpickler for a huge memo table
    "LONG_BINPUT": b"\x80\x02]r\x00\xe1\xf5\x05.",  # protocol 2: EMPTY_LIST, LONG_BINPUT 100000000, STOP
    "PUT": b"(lp100000000\n.",  # protocol 0: MARK, LIST, PUT 100000000
}


@pytest.mark.parametrize("case", list(MEMO))
def test_a_huge_memo_index_is_refused_without_allocating(case):
    before = _rss_mb()
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="x.metadata: refused: memo index 100000000"):
        load_pickle(MEMO[case], "x.metadata")
    assert time.monotonic() - t0 < 2 and _rss_mb() - before < 100


def test_real_pickles_keep_their_memo(tmp_path):
    value = {"a": [_dag(5)] * 300, "s": "r" * 1000}
    for proto in range(6):
        assert load_pickle(pickle.dumps(value, protocol=proto), "x") is not None


class Unknown:  # a class of the test module: outside the allow-list
    def __init__(self) -> None:
        self.v = 1


class WithState:
    def __init__(self) -> None:
        self.v = 1

    def __setstate__(self, state):
        self.__dict__.update(state)


@pytest.mark.parametrize("value", [Unknown(), WithState(), {"x": [Unknown()]}], ids=["NEWOBJ", "BUILD", "nested"])
@pytest.mark.parametrize("proto", [1, 2, 4])  # protocol 0 writes storages as text torch cannot read
def test_objects_of_unknown_classes_make_the_file_refused_by_name(tmp_path, value, proto):
    path = tmp_path / "a.pt"
    torch.save({"w": torch.ones(1), "obj": value}, path, pickle_protocol=proto)
    with pytest.raises(
        CheckpointError,
        match=r"a.pt: refused: the pickle holds an object of class \S*(Unknown|WithState), outside the allow",
    ):
        compare_checkpoints(path, path)


def test_allow_listed_classes_are_read(tmp_path):
    import argparse
    import collections

    path = tmp_path / "a.pt"
    torch.save(
        {
            "args": argparse.Namespace(lr=1.0),
            "od": collections.OrderedDict(a=1),
            "dtype": torch.bfloat16,
            "size": torch.Size([2, 3]),
        },
        path,
    )
    assert compare_checkpoints(path, Path(path)).equal


SIZED = {  # REDUCE calls whose size the file does not pay for
    "bytes(10**12)": b"\x80\x02c__builtin__\nbytes\n\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85R.",
    "bytearray(10**12)": b"\x80\x02c__builtin__\nbytearray\n\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85R.",
    "list(range(10**12))": (b"\x80\x02c__builtin__\nlist\nc__builtin__\nrange\n"
                            b"\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85R\x85R."),
}


@pytest.mark.parametrize("case", list(SIZED))
def test_calls_that_would_build_more_than_the_file_pays_for_are_refused(case):
    assert pickle.loads(SIZED[case].replace(b"\x8a\x06\x00\x10\xa5\xd4\xe8\x00", b"\x8a\x01\x03")) is not None  # valid
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="x.pkl: corrupt or truncated pickle .*refused: "):
        load_pickle(SIZED[case], "x.pkl")
    assert time.monotonic() - t0 < 2


def test_legitimate_bytes_and_ranges_still_load():
    value = {"b": b"abc", "ba": bytearray(b"xyz"), "r": range(5), "l": list(range(5))}
    for proto in range(6):
        assert load_pickle(pickle.dumps(value, protocol=proto), "x") == value
