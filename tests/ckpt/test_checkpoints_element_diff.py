"""A differing pair answered from the differing elements alone (checks/element_diff.py): the same
report as decoding both whole tensors with torch (bits.tensor_diff, the reference), for every dtype
it takes, from DCP, safetensors and torch.save files; torch never imported by the comparison; and
whole-tensor differences (more than LIMIT elements) still decoded with torch, as before."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from pytest_miles.checks import element_diff  # noqa: E402
from pytest_miles.checks.bits import tensor_diff  # noqa: E402
from pytest_miles.checks.compare import compare_checkpoints  # noqa: E402
from pytest_miles.ckpt.layouts import load_layout  # noqa: E402
from pytest_miles.ckpt.native import native_reader  # noqa: E402
from tests.helpers.checkpoints import save_dcp  # noqa: E402

pytestmark = pytest.mark.skipif(native_reader() is None, reason="the native reader was not built")

DTYPES = ["float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"]


def _pair(dtype: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A tensor and a copy with a few elements changed: single bits (sign, exponent, mantissa),
    NaNs with other payloads, -0.0 against 0.0, the first and the last element."""
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    if dtype == "bool":
        a = torch.randint(0, 2, (37, 53), generator=g).bool()
    elif dt.is_floating_point:
        a = torch.randn(37, 53, generator=g).to(dt)
        a.view(-1)[100] = float("nan")
        a.view(-1)[101] = 0.0
    else:
        info = torch.iinfo(dt)
        a = torch.randint(max(info.min, -10**6), min(info.max, 10**6), (37, 53), generator=g, dtype=torch.int64).to(dt)
    b = a.clone()
    flips = [(0, 0), (7, 8 * b.element_size() - 1), (100, 1), (500, 8 * b.element_size() - 2), (b.numel() - 1, 3),
             (1234, 5)]
    if dtype == "bool":
        for flat, _ in flips:
            b.view(-1)[flat] = not bool(a.view(-1)[flat])
        return a, b
    ints = b.view(-1).view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[b.element_size()])
    width = b.element_size() * 8
    for flat, bit in flips:
        ints[flat] ^= (1 << bit) if bit < width - 1 else -(1 << bit) if b.element_size() > 1 else 0x80
    if dt.is_floating_point:
        b.view(-1)[101] = -0.0
    return a, b


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_elements_alone_give_what_torch_gives(dtype, tmp_path):
    a, b = _pair(dtype, DTYPES.index(dtype))
    expected = tensor_diff("w", a, b)
    assert expected is not None and expected.differing >= 5
    pa = save_dcp(tmp_path / "a", {"w": a, "same": torch.ones(3)})
    pb = save_dcp(tmp_path / "b", {"w": b, "same": torch.ones(3)})
    report = compare_checkpoints(pa, pb)
    assert [d.name for d in report.differences] == ["w"]
    assert report.first.data == expected.to_json()
    assert report.first.detail == expected.render()
    full = compare_checkpoints(pa, pb, fast=False)
    assert full.first.data == expected.to_json()
    la, lb = load_layout(pa), load_layout(pb)  # and it was the elements alone that said so
    assert element_diff.element_diff(native_reader(), la.entries["w"], lb.entries["w"]) == expected


def test_safetensors_and_torch_files_too(tmp_path):
    from safetensors.torch import save_file

    a, b = _pair("bfloat16", 3)
    expected = tensor_diff("w", a, b).to_json()
    save_file({"w": a}, str(tmp_path / "a.safetensors"))
    save_file({"w": b}, str(tmp_path / "b.safetensors"))
    assert compare_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors").first.data == expected
    torch.save({"w": a}, tmp_path / "a.pt")
    torch.save({"w": b}, tmp_path / "b.pt")
    assert compare_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt").first.data == expected
    for a_, b_ in (("a.safetensors", "b.safetensors"), ("a.pt", "b.pt")):
        ea = next(iter(load_layout(tmp_path / a_).entries.values()))
        eb = next(iter(load_layout(tmp_path / b_).entries.values()))
        assert element_diff.element_diff(native_reader(), ea, eb).to_json() == expected


def test_without_the_native_reader_the_report_is_the_same(tmp_path, monkeypatch):
    a, b = _pair("float32", 9)
    pa, pb = save_dcp(tmp_path / "a", {"w": a}), save_dcp(tmp_path / "b", {"w": b})
    fast = compare_checkpoints(pa, pb).to_json()
    monkeypatch.setenv("PYTEST_MILES_NATIVE", "0")
    slow = compare_checkpoints(pa, pb).to_json()
    fast.pop("seconds"), slow.pop("seconds")
    assert fast == slow


def test_a_whole_tensor_difference_is_decoded_with_torch(tmp_path, monkeypatch):
    a = torch.randn(300, 300, generator=torch.Generator().manual_seed(1))
    b = a + 1.0  # every element: more than LIMIT
    monkeypatch.setattr(element_diff, "LIMIT", 1000)
    report = compare_checkpoints(save_dcp(tmp_path / "a", {"w": a}), save_dcp(tmp_path / "b", {"w": b}))
    assert report.first.data == tensor_diff("w", a, b).to_json() and report.first.data["differing"] == 90_000


CHILD = textwrap.dedent("""
    import json, sys
    from pytest_miles.checks.compare import compare_checkpoints
    report = compare_checkpoints(sys.argv[1], sys.argv[2])
    print(json.dumps({"torch": "torch" in sys.modules, "data": report.first.data}))
""")


def test_a_flipped_byte_is_reported_without_importing_torch(tmp_path):
    a, b = _pair("float32", 5)
    pa, pb = save_dcp(tmp_path / "a", {"w": a}), save_dcp(tmp_path / "b", {"w": b})
    out = subprocess.run([sys.executable, "-c", CHILD, str(pa), str(pb)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got == {"torch": False, "data": json.loads(json.dumps(tensor_diff("w", a, b).to_json()))}


@pytest.mark.parametrize("dtype", DTYPES)
def test_first_names_the_first_differing_element_alone(dtype, tmp_path):
    """--first: the first differing tensor's first differing element (index, values, bits as the full
    report prints them), nothing counted; without --first the full count, as before."""
    a, b = _pair(dtype, DTYPES.index(dtype))
    full = tensor_diff("w", a, b)
    pa = save_dcp(tmp_path / "a", {"w": a, "same": torch.ones(3)})
    pb = save_dcp(tmp_path / "b", {"w": b, "same": torch.ones(3)})
    for fast in (True, False):
        d = compare_checkpoints(pa, pb, first=True, fast=fast).first
        assert d.data["first_only"] is True and d.data["differing"] is None and d.data["max_ulp"] is None
        assert [d.data[k] for k in ("first_index", "value_a", "value_b", "bits_a", "bits_b")] == [
            list(full.first_index), full.value_a, full.value_b, full.bits_a, full.bits_b]
        assert d.detail.endswith("; --first: the rest not compared") and " of " not in d.detail.split(":")[1]
        assert compare_checkpoints(pa, pb, fast=fast).first.data == full.to_json()  # without --first: unchanged


def test_first_on_safetensors_and_torch_files_too(tmp_path):
    from safetensors.torch import save_file

    a, b = _pair("bfloat16", 4)
    full = tensor_diff("w", a, b)
    save_file({"w": a}, str(tmp_path / "a.safetensors"))
    save_file({"w": b}, str(tmp_path / "b.safetensors"))
    torch.save({"w": a}, tmp_path / "a.pt")
    torch.save({"w": b}, tmp_path / "b.pt")
    for a_, b_ in (("a.safetensors", "b.safetensors"), ("a.pt", "b.pt")):
        d = compare_checkpoints(tmp_path / a_, tmp_path / b_, first=True).first.data
        assert d["first_only"] and d["first_index"] == list(full.first_index) and d["differing"] is None
        assert (d["value_a"], d["value_b"], d["bits_a"], d["bits_b"]) == (full.value_a, full.value_b, full.bits_a,
                                                                          full.bits_b)


@pytest.mark.parametrize("name", ["dcp", "a.safetensors", "a.pt"])
def test_first_without_the_native_reader_says_the_same(name, tmp_path, monkeypatch):
    """--first is one answer whether or not the C reader was built at install (no compiler there, or
    PYTEST_MILES_NATIVE=0): the decoded path reports the first differing element alone, in the same words
    and JSON as the native one (a fresh clone run from its tree without an install has no reader)."""
    from safetensors.torch import save_file

    a, b = _pair("float32", 7)
    if name == "dcp":
        pa, pb = save_dcp(tmp_path / "a", {"w": a}), save_dcp(tmp_path / "b", {"w": b})
    else:
        pa, pb = tmp_path / name, tmp_path / name.replace("a.", "b.")
        for path, t in ((pa, a), (pb, b)):
            save_file({"w": t}, str(path)) if name.endswith(".safetensors") else torch.save({"w": t}, path)
    native = compare_checkpoints(pa, pb, first=True).first
    monkeypatch.setenv("PYTEST_MILES_NATIVE", "0")
    decoded = compare_checkpoints(pa, pb, first=True).first
    assert decoded.data == native.data and decoded.detail == native.detail, (decoded.detail, native.detail)
    assert decoded.data["first_only"] is True and decoded.data["differing"] is None
    assert decoded.detail.startswith("w: first differing element at [")


FIRST_CHILD = textwrap.dedent("""
    import json, sys
    from pytest_miles.checks.compare import compare_checkpoints
    report = compare_checkpoints(sys.argv[1], sys.argv[2], first=True)
    print(json.dumps({"torch": "torch" in sys.modules, "data": report.first.data}))
""")


def test_first_on_a_whole_tensor_difference_imports_no_torch(tmp_path):
    """Every element differs (beyond LIMIT: the full report decodes with torch); --first reads one
    element of each side and imports no torch."""
    a = torch.randn(300, 300, generator=torch.Generator().manual_seed(2))
    b = a + 1.0
    pa, pb = save_dcp(tmp_path / "a", {"w": a}), save_dcp(tmp_path / "b", {"w": b})
    out = subprocess.run([sys.executable, "-c", FIRST_CHILD, str(pa), str(pb)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["torch"] is False and got["data"]["first_index"] == [0, 0] and got["data"]["differing"] is None
    assert got["data"]["value_a"] == repr(a[0, 0].item()) and got["data"]["value_b"] == repr(b[0, 0].item())
