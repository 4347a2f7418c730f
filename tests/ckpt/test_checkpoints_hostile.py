"""Malformed and hostile checkpoints: each is exit 2 naming the file, no hang (20 s), inputs
unchanged (hash and mtime), and no pickle payload ever runs (it would create a marker file)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from pytest_miles.checks.checkpoints import CheckpointError, compare_checkpoints, write_manifest  # noqa: E402
from pytest_miles.cli import main  # noqa: E402
from tests.helpers.checkpoints import make_state, save_dcp, save_hf, save_legacy_megatron, tree_state  # noqa: E402

MARKERS: list[Path] = []


class Payload:
    """Pickles as a call to os.system that would create a marker file: must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker
        MARKERS.append(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _fifo(path: Path) -> Path:
    if path.exists():
        path.unlink()
    os.mkfifo(path)
    return path


def _socket(path: Path) -> Path:
    if path.exists():
        path.unlink()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    return path


def _st_raw(path: Path, header: bytes | dict, data: bytes = b"\0" * 64) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


class _World:
    """The good checkpoints and the hostile cases being built: {case: (good, bad, text the error must contain)}."""

    def __init__(self, t: Path) -> None:
        self.t, self.marker = t, t / "PAYLOAD-RAN"
        self.state = make_state(0, layers=2, hidden=16)
        self.cases: dict[str, tuple[Path, Path, str]] = {}
        state = self.state
        self.good = {"dcp": save_dcp(t / "good-dcp", state, {"step": 3}),
                     "hf": save_hf(t / "good-hf", state, 3),
                     "legacy": save_legacy_megatron(t / "good-legacy", 10, state)}
        torch.save({"model": state, "step": 3}, t / "good.pt")
        self.good["pt"] = t / "good.pt"
        save_file({"w": torch.ones(16)}, str(t / "good.safetensors"))
        self.good["st"] = t / "good.safetensors"

    def case(self, name: str, kind: str, bad: Path, text: str) -> None:
        self.cases[name] = (self.good[kind], bad, text)

    def copy(self, kind: str, name: str) -> Path:
        dst = self.t / name
        (shutil.copytree if self.good[kind].is_dir() else shutil.copy)(self.good[kind], dst)
        return dst


def _payload_cases(w: _World) -> None:
    """Hostile cases: payloads."""
    t, marker, state, good, case, copy = w.t, w.marker, w.state, w.good, w.case, w.copy  # noqa: F841
    torch.save({"model": state, "step": Payload(marker)}, t / "evil.pt")
    case("payload in a .pt", "pt", t / "evil.pt", "posix.system")
    case("payload in a DCP non-tensor item", "dcp", save_dcp(t / "evil-dcp", state, {"step": Payload(marker)}),
         "posix.system")
    x = copy("dcp", "evil-metadata")
    md = pickle.loads((x / ".metadata").read_bytes())  # our own file: trusted here
    md.planner_data = {"step": Payload(marker)}
    (x / ".metadata").write_bytes(pickle.dumps(md))
    case("payload in .metadata", "dcp", x, "posix.system")
    x = copy("dcp", "evil-common")
    torch.save({"args": {"seed": 0}, "hook": Payload(marker)}, x / "common.pt")
    case("payload in common.pt", "dcp", x, "posix.system")
    x = save_legacy_megatron(t / "evil-legacy", 10, state, extra={"opt": Payload(marker)})
    case("payload in legacy model_optim_rng.pt", "legacy", x, "posix.system")
    ev = t / "evil-eval.pt"
    torch.save({"x": torch.ones(2)}, ev)
    with zipfile.ZipFile(ev) as z:  # a pickle calling builtins.eval, in a real torch zip
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    cmd = f"__import__('os').system('touch {marker}')".encode()
    members[pkl] = b"\x80\x02cbuiltins\neval\nX" + struct.pack("<I", len(cmd)) + cmd + b"\x85R."
    with zipfile.ZipFile(ev, "w", zipfile.ZIP_STORED) as z:
        for n, data in members.items():
            z.writestr(n, data)
    case("builtins.eval in a .pt", "pt", ev, "builtins.eval")


def _special_file_cases(w: _World) -> None:
    """Hostile cases: not regular files."""
    t, marker, state, good, case, copy = w.t, w.marker, w.state, w.good, w.case, w.copy  # noqa: F841
    x = copy("dcp", "fifo-distcp")
    _fifo(x / "__0_0.distcp")
    case("FIFO named like a .distcp", "dcp", x, "__0_0.distcp: cannot be read (a FIFO")
    x = copy("dcp", "fifo-metadata")
    _fifo(x / ".metadata")
    case("FIFO named .metadata", "dcp", x, ".metadata: cannot be read (a FIFO")
    x = copy("hf", "fifo-shard")
    _fifo(x / "model-00002-of-00002.safetensors")
    case("FIFO named like a shard", "hf", x, "model-00002-of-00002.safetensors: cannot be read (a FIFO")
    x = copy("legacy", "fifo-tracker")
    _fifo(x / "latest_checkpointed_iteration.txt")
    case("FIFO as the Megatron tracker", "legacy", x, "latest_checkpointed_iteration.txt: cannot be read (a FIFO")
    case("FIFO as the argument", "pt", _fifo(t / "fifo.pt"), "fifo.pt: cannot be read (a FIFO")
    x = copy("hf", "socket-shard")
    (x / "model-00001-of-00002.safetensors").unlink()
    _socket(x / "model-00001-of-00002.safetensors")
    case("socket named like a shard", "hf", x, "model-00001-of-00002.safetensors: cannot be read")


def _safetensors_cases(w: _World) -> None:
    """Hostile cases: safetensors."""
    t, marker, state, good, case, copy = w.t, w.marker, w.state, w.good, w.case, w.copy  # noqa: F841
    case("safetensors header not JSON", "st", _st_raw(t / "badjson.safetensors", b"{not json"),
         "badjson.safetensors: corrupt safetensors header")
    (t / "long.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    case("safetensors header length past the file", "st", t / "long.safetensors",
         "long.safetensors: corrupt safetensors header (declares")
    case("safetensors header is a list", "st", _st_raw(t / "list.safetensors", b"[1, 2]"),
         "list.safetensors: corrupt safetensors header (a list")
    case("overlapping safetensors offsets", "st", _st_raw(t / "overlap.safetensors", {
        "a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
        "b": {"dtype": "F32", "shape": [8], "data_offsets": [16, 48]}}),
        "overlap.safetensors: corrupt safetensors header: tensor")
    case("safetensors offsets past the file", "st", _st_raw(t / "past.safetensors", {
        "w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}), "past.safetensors: truncated: tensor 'w'")
    case("safetensors length not dtype x shape", "st", _st_raw(t / "len.safetensors", {
        "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}}),
        "len.safetensors: corrupt safetensors entry 'w'")
    x = copy("hf", "wrong-shard")
    idx = x / "model.safetensors.index.json"
    name = next(iter(state))
    data = json.loads(idx.read_text())
    data["weight_map"][name] = "model-00002-of-00002.safetensors"
    idx.write_text(json.dumps(data))
    case("index places a tensor in the wrong shard", "hf", x, "model-00001-of-00002.safetensors: holds")
    x = copy("hf", "missing-shard")
    data = json.loads((x / "model.safetensors.index.json").read_text())
    data["weight_map"]["extra.weight"] = "model-00003-of-00003.safetensors"
    (x / "model.safetensors.index.json").write_text(json.dumps(data))
    case("index names a missing shard", "hf", x, "model-00003-of-00003.safetensors: shard listed in")
    x = copy("hf", "bad-index")
    (x / "model.safetensors.index.json").write_text("{")
    case("index json not JSON", "hf", x, "model.safetensors.index.json: unusable safetensors index")


def _shift_zip_directory(data: bytes) -> bytes:
    """The last zip end record's central directory offset 4096 bytes on (torch writes a zip64 one, which zipfile
    reads first): zipfile then places every entry of that archive 4096 bytes before its start."""
    raw = bytearray(data)
    zip64 = b"PK\x06\x06" in raw
    end, at, fmt = (raw.rindex(b"PK\x06\x06"), 48, "<Q") if zip64 else (raw.rindex(b"PK\x05\x06"), 16, "<I")
    n = struct.calcsize(fmt)
    raw[end + at:end + at + n] = struct.pack(fmt, struct.unpack(fmt, raw[end + at:end + at + n])[0] + 4096)
    return bytes(raw)


def _torch_file_cases(w: _World) -> None:
    """Hostile cases: torch files."""
    t, marker, state, good, case, copy = w.t, w.marker, w.state, w.good, w.case, w.copy  # noqa: F841
    (t / "random.pt").write_bytes(os.urandom(4096))
    case("random bytes as .pt", "pt", t / "random.pt", "random.pt: not a torch zip archive")
    shutil.copy(good["pt"], t / "trunc.pt")
    (t / "trunc.pt").write_bytes((t / "trunc.pt").read_bytes()[:700])
    case("truncated .pt", "pt", t / "trunc.pt", "trunc.pt: corrupt or truncated torch file")
    with zipfile.ZipFile(good["pt"]) as z, zipfile.ZipFile(t / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as out:
        for i in z.infolist():
            out.writestr(i.filename, z.read(i.filename))
    case("compressed entries in a .pt", "pt", t / "deflated.pt", "deflated.pt: entry")
    (t / "dir-offset.pt").write_bytes(_shift_zip_directory(good["pt"].read_bytes()))
    case("zip entries placed before the archive", "pt", t / "dir-offset.pt", "dir-offset.pt: corrupt torch file (an "
         "entry at byte -")
    raw = bytearray(good["pt"].read_bytes())
    raw[raw.index(b"PK\x01\x02") + 6] = 0xFF  # the first central directory entry's "version needed to extract"
    (t / "version.pt").write_bytes(raw)
    case("zip entry needing an unknown zip version", "pt", t / "version.pt", "version.pt: corrupt or truncated torch "
         "file (zip file version")
    x = t / "dir-of-pt"
    x.mkdir()
    shutil.copy(t / "random.pt", x / "model.pt")
    gd = t / "good-dir-of-pt"
    gd.mkdir()
    shutil.copy(good["pt"], gd / "model.pt")
    good["ptdir"] = gd
    case("dir holding a corrupt .pt", "ptdir", x, "model.pt: not a torch zip archive")


def _dcp_cases(w: _World) -> None:
    """Hostile cases: DCP."""
    t, marker, state, good, case, copy = w.t, w.marker, w.state, w.good, w.case, w.copy  # noqa: F841
    x = copy("dcp", "dict-metadata")
    (x / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": 1}))
    case(".metadata unpickles to a dict", "dcp", x, ".metadata: not DCP metadata (a dict")
    x = copy("dcp", "garbage-metadata")
    (x / ".metadata").write_bytes(b"garbage")
    case(".metadata garbage", "dcp", x, ".metadata: corrupt or truncated pickle")
    x = copy("dcp", "truncated-distcp")
    (x / "__0_0.distcp").write_bytes((x / "__0_0.distcp").read_bytes()[:1000])
    case("truncated .distcp", "dcp", x, "__0_0.distcp: truncated")
    x = copy("dcp", "escape-metadata")
    md = pickle.loads((x / ".metadata").read_bytes())
    for info in md.storage_data.values():
        info.relative_path = "../good.pt"
    (x / ".metadata").write_bytes(pickle.dumps(md))
    case(".metadata points outside the dir", "dcp", x, ".metadata: malformed storage entry")
    x = copy("dcp", "overlap-metadata")
    md = pickle.loads((x / ".metadata").read_bytes())
    infos = list(md.storage_data.values())
    infos[1].offset = infos[0].offset
    (x / ".metadata").write_bytes(pickle.dumps(md))
    case("two DCP items share bytes", "dcp", x, "overlap")
    x = copy("dcp", "blob-dir-offset")  # the last item's torch.save blob, read from memory
    (x / "__0_0.distcp").write_bytes(_shift_zip_directory((x / "__0_0.distcp").read_bytes()))
    case("a .distcp blob's zip entries placed before it", "dcp", x, "__0_0.distcp (item")
    x = copy("dcp", "dir-distcp")
    (x / "__0_0.distcp").unlink()
    (x / "__0_0.distcp").mkdir()
    case(".distcp is a directory", "dcp", x, "__0_0.distcp: cannot be read")


def _megatron_cases(w: _World) -> None:
    """Hostile cases: Megatron dirs."""
    t, marker, state, good, case, copy = w.t, w.marker, w.state, w.good, w.case, w.copy  # noqa: F841
    x = copy("legacy", "bad-tracker")
    (x / "latest_checkpointed_iteration.txt").write_text("ten")
    case("tracker is not a number", "legacy", x, "latest_checkpointed_iteration.txt: expected an iteration number")
    x = copy("legacy", "missing-iter")
    (x / "latest_checkpointed_iteration.txt").write_text("30")
    case("tracker names a missing iteration", "legacy", x, "names iteration 30, but")
    x = copy("legacy", "empty-rank")
    (x / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt").unlink()
    case("legacy rank dir without a .pt", "legacy", x, "mp_rank_00: legacy Megatron rank dir without a .pt")
    os.symlink(t / "loop2", t / "loop1")
    os.symlink(t / "loop1", t / "loop2")
    case("symlink loop", "dcp", t / "loop1", "loop1: symlink loop")
    (t / "empty").mkdir()
    case("empty directory", "dcp", t / "empty", "empty: no checkpoint found")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Good checkpoints of every kind and the hostile cases, built once for the module:
    {case: (good, bad, text the error must contain)}."""
    w = _World(tmp_path_factory.mktemp("hostile"))
    for build in (_payload_cases, _special_file_cases, _safetensors_cases, _torch_file_cases, _dcp_cases,
                  _megatron_cases):
        build(w)
    return w.t, w.marker, w.cases


CASES = [
    "payload in a .pt", "payload in a DCP non-tensor item", "payload in .metadata", "payload in common.pt",
    "payload in legacy model_optim_rng.pt", "builtins.eval in a .pt", "FIFO named like a .distcp",
    "FIFO named .metadata", "FIFO named like a shard", "FIFO as the Megatron tracker", "FIFO as the argument",
    "socket named like a shard", "safetensors header not JSON", "safetensors header length past the file",
    "safetensors header is a list", "overlapping safetensors offsets", "safetensors offsets past the file",
    "safetensors length not dtype x shape", "index places a tensor in the wrong shard", "index names a missing shard",
    "index json not JSON", "random bytes as .pt", "truncated .pt", "compressed entries in a .pt",
    "zip entries placed before the archive", "zip entry needing an unknown zip version",
    "dir holding a corrupt .pt", ".metadata unpickles to a dict", ".metadata garbage", "truncated .distcp",
    ".metadata points outside the dir", "two DCP items share bytes",
    "a .distcp blob's zip entries placed before it", ".distcp is a directory",
    "tracker is not a number", "tracker names a missing iteration", "legacy rank dir without a .pt", "symlink loop",
    "empty directory",
]


def test_every_case_is_listed(world):
    assert sorted(world[2]) == sorted(CASES) and len(CASES) >= 25


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", CASES)
def test_hostile_input_is_exit_2_naming_the_file(world, case, capsys):
    t, marker, cases = world
    good, bad, text = cases[case]
    before = tree_state(t)
    for a, b in ((good, bad), (bad, good)):  # invalid on either side
        with pytest.raises(CheckpointError) as exc:
            compare_checkpoints(a, b)
        assert text in str(exc.value), str(exc.value)
    capsys.readouterr()
    assert main(["compare", str(good), str(bad)]) == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err, err
    assert not marker.exists(), "a pickle payload ran"
    assert tree_state(t) == before, "inputs must never be written"


@pytest.mark.timeout(60)
def test_cli_process_exit_2_without_hang(world):
    """The installed entry point, as a user runs it, on a few of the cases (20 s each at most)."""
    t, marker, cases = world
    for case in ("FIFO as the argument", "FIFO named .metadata", "payload in legacy model_optim_rng.pt",
                 "random bytes as .pt"):
        good, bad, text = cases[case]
        r = subprocess.run([sys.executable, "-m", "pytest_miles.cli", "compare", str(good), str(bad)],
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 2 and text in r.stderr and "Traceback" not in r.stderr, (case, r.stderr[-1500:])
    assert not marker.exists()


def test_manifest_refuses_payload_and_writes_nothing(world, tmp_path):
    t, marker, cases = world
    before = tree_state(t)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused: the pickle calls posix\.system"):
        write_manifest(cases["payload in a .pt"][1], tmp_path / "m.json")
    r = subprocess.run([sys.executable, "-m", "pytest_miles.cli", "manifest",
                        str(cases["payload in legacy model_optim_rng.pt"][1]),
                        "-o", str(tmp_path / "m2.json")], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "model_optim_rng.pt: refused: the pickle calls posix.system" in r.stderr, r.stderr
    assert not marker.exists() and not (tmp_path / "m.json").exists() and tree_state(t) == before
