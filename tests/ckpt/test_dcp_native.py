"""The native DCP reader (pytest_miles/ckpt/dcpscan/, module `_dcpscan`) and the fast path built
on it (dcp_fast.py).

What must hold, whatever the input: the fast path answers EQUAL only where the full Python path
does, with the same report; it hands over (None) on anything else, malformed and hostile files
included; the native reader never crashes, never vouches for a `.metadata` the Python reader
rejects, and never leaves a thread or a descriptor behind. Real DCP saves only (world 1 and world 2
over gloo, FSDP2-sharded, AdamW state), real payload pickles, real mutations of real files.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pytest_miles.checks import dcp_fast  # noqa: E402
from pytest_miles.checks.checkpoints import CheckpointError, compare_checkpoints  # noqa: E402
from pytest_miles.ckpt.model import ITEMSIZE  # noqa: E402
from pytest_miles.cli import main  # noqa: E402
from tests.helpers.checkpoints import (  # noqa: E402
    make_state,
    optimizer_state,
    save_dcp,
    tree_state,
)

native = dcp_fast.native_reader()
pytestmark = pytest.mark.skipif(native is None, reason="the native reader was not built (no C compiler at install)")


def _json(report) -> dict:
    out = report.to_json()
    out.pop("seconds")
    return out


@pytest.fixture(scope="module")
def saves(dcp_pairs):
    """Equal pairs of real saves, each side written by its own save (`dcp_pairs`, tests/ckpt/conftest.py)."""
    return dcp_pairs["plain"][0].parent, dcp_pairs


PAIRS = ["plain", "adamw", "many", "fsdp2-sharded", "dtensor-replicated"]


def test_dtype_table_is_the_python_readers():
    assert native.dtypes() == ITEMSIZE


@pytest.mark.parametrize("name", PAIRS)
def test_fast_path_runs_on_real_saves_and_reports_what_the_full_path_reports(saves, name, capsys):
    _, pairs = saves
    a, b = pairs[name]
    before = tree_state(a) | tree_state(b)
    fast = dcp_fast.fast_equal(a, b)
    assert fast is not None, f"{name}: the native path did not vouch for a plain, equal DCP pair"
    full = compare_checkpoints(a, b, fast=False)
    assert full.passed and _json(fast) == _json(full)
    assert _json(compare_checkpoints(a, b)) == _json(full)  # the default takes the fast path
    assert main(["compare", str(a), str(b)]) == 0
    printed = capsys.readouterr().out.splitlines()
    expected = full.render().splitlines()
    assert [x for x in printed if " in " not in x] == [x for x in expected if " in " not in x]  # all but timing
    assert tree_state(a) | tree_state(b) == before


def _outcome(a, b, **kw) -> tuple[str, object]:
    try:
        return "report", _json(compare_checkpoints(a, b, **kw))
    except CheckpointError as exc:
        return "error", str(exc).split(" (legacy")[0]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_any_difference_hands_over_to_the_full_path(saves, tmp_path):
    _, pairs = saves
    a, b = pairs["plain"]  # every item raw: a flipped byte is a flipped value
    flipped = _copy(b, tmp_path / "flipped")
    data = flipped / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    assert dcp_fast.fast_equal(a, flipped) is None
    report = compare_checkpoints(a, flipped)
    assert not report.passed and _json(report) == _json(compare_checkpoints(a, flipped, fast=False))
    a, b = pairs["adamw"]
    container = _copy(b, tmp_path / "container")  # a byte of a torch.save item's zip container, not a value
    data = container / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    assert dcp_fast.fast_equal(a, container) is None
    assert _outcome(a, container) == _outcome(a, container, fast=False) == (
        "error", f"{data} (item 'optim.param_groups.0.lr' at byte 0): not a torch zip archive")

    extra = _copy(b, tmp_path / "extra-file")
    (extra / "__9_0.distcp").write_bytes(b"not referenced")
    assert dcp_fast.fast_equal(a, extra) is None  # the full path notes it and compares it as a side file
    assert _json(compare_checkpoints(a, extra)) == _json(compare_checkpoints(a, extra, fast=False))

    common = _copy(b, tmp_path / "with-common")
    torch.save({"args": {"seed": 0}}, common / "common.pt")
    assert dcp_fast.fast_equal(a, common) is None

    other = tmp_path / "other-weights"
    save_dcp(other, optimizer_state(1))
    assert dcp_fast.fast_equal(a, other) is None
    assert not compare_checkpoints(a, other).passed

    renamed = tmp_path / "renamed"
    state = make_state(0)
    save_dcp(renamed, {f"x.{k}": v for k, v in state.items()})
    assert dcp_fast.fast_equal(pairs["plain"][0], renamed) is None


def _rewrite(src: Path, dst: Path, change) -> Path:
    """A copy whose .metadata is the original's (our own file, unpickled here as trusted) changed."""
    shutil.copytree(src, dst)
    md = pickle.loads((dst / ".metadata").read_bytes())
    change(md)
    (dst / ".metadata").write_bytes(pickle.dumps(md))
    return dst


def _first_tensor(md):
    return next(v for v in md.state_dict_metadata.values() if type(v).__name__ == "TensorStorageMetadata")


def _malformed(src: Path, t: Path) -> dict[str, Path]:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    cases = {}

    def case(name, change):
        cases[name] = _rewrite(src, t / name.replace(" ", "-"), change)

    def chunk_outside(md):
        tmd = _first_tensor(md)
        tmd.chunks[0] = ChunkStorageMetadata(offsets=torch.Size([1] + [0] * (len(tmd.size) - 1)), sizes=tmd.size)

    def chunk_missing(md):
        tmd = _first_tensor(md)
        tmd.chunks[0] = ChunkStorageMetadata(offsets=tmd.chunks[0].offsets,
                                             sizes=torch.Size([tmd.size[0] - 1, *tmd.size[1:]]))

    def no_storage(md):
        key = next(iter(md.storage_data))
        del md.storage_data[key]

    def negative_length(md):
        next(iter(md.storage_data.values())).length = -4

    def absolute_path(md):
        next(iter(md.storage_data.values())).relative_path = "/etc/passwd"

    def dotdot_path(md):
        next(iter(md.storage_data.values())).relative_path = "../x.distcp"

    def overlap(md):
        infos = list(md.storage_data.values())
        infos[1].offset = infos[0].offset

    def past_the_file(md):
        next(iter(md.storage_data.values())).offset = 10**9

    def unknown_dtype(md):
        _first_tensor(md).properties.dtype = torch.quint8  # quantized: in neither reader's table

    def payload(md):
        class Evil:
            def __reduce__(self):
                return os.system, (f"touch {t / 'PAYLOAD-RAN'}",)
        md.planner_data = {"x": Evil()}

    for name, change in [("chunk outside its tensor", chunk_outside), ("chunks miss elements", chunk_missing),
                         ("chunk without storage", no_storage), ("negative length", negative_length),
                         ("absolute relative_path", absolute_path), ("dotdot relative_path", dotdot_path),
                         ("items share bytes", overlap), ("item past the file", past_the_file),
                         ("unknown dtype", unknown_dtype), ("payload in planner_data", payload)]:
        case(name, change)
    x = _copy(src, t / "metadata-a-dict")
    (x / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}, "storage_data": {}}))
    cases[".metadata a dict"] = x
    x = _copy(src, t / "truncated-metadata")
    (x / ".metadata").write_bytes((x / ".metadata").read_bytes()[:-40])
    cases["truncated .metadata"] = x
    x = _copy(src, t / "truncated-distcp")
    (x / "__0_0.distcp").write_bytes((x / "__0_0.distcp").read_bytes()[:100])
    cases["truncated .distcp"] = x
    return cases


def test_scan_of_a_file_read_as_it_goes_is_the_scan_of_its_bytes(saves, tmp_path):
    """scan_fd (the fast path's reader: the file read 256 KiB at a time, the pages behind given back)
    gives what scan gives for the same bytes; a file shorter than said, or empty, is declined."""
    _, pairs = saves
    for name in PAIRS:
        meta = pairs[name][0] / ".metadata"
        with open(meta, "rb") as f:
            assert native.scan_fd(f.fileno(), os.fstat(f.fileno()).st_size) == native.scan(meta.read_bytes()), name
    big = pairs["many"][0] / ".metadata"
    assert big.stat().st_size > 2**18  # more than a window: pages were given back behind the reader
    short = tmp_path / "short"
    short.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    with open(short, "rb") as f:
        assert native.scan_fd(f.fileno(), big.stat().st_size) is None
        assert native.scan_fd(f.fileno(), 0) is None
    native.release()


def test_malformed_metadata_is_declined_and_stays_an_error_even_against_its_own_copy(saves, tmp_path):
    _, pairs = saves
    cases = _malformed(pairs["plain"][0], tmp_path)
    assert len(cases) == 13
    for name, bad in cases.items():
        if name not in ("truncated .distcp", "item past the file"):  # those two: file sizes, checked in Python
            assert native.scan((bad / ".metadata").read_bytes()) is None, name
        twin = _copy(bad, tmp_path / f"{bad.name}-twin")
        before = tree_state(bad) | tree_state(twin)
        assert dcp_fast.fast_equal(bad, twin) is None, name
        with pytest.raises(CheckpointError) as err:
            compare_checkpoints(bad, twin)  # byte-identical invalid copies are still invalid: exit 2
        assert str(bad) in str(err.value) or str(twin) in str(err.value), (name, str(err.value))
        assert tree_state(bad) | tree_state(twin) == before, name
    assert not (tmp_path / "PAYLOAD-RAN").exists()


def test_unusual_but_valid_metadata_is_left_to_the_python_reader(saves, tmp_path):
    """What the native reader does not vouch for is not an error: the full path decides."""
    import collections

    _, pairs = saves
    src = pairs["plain"][0]

    def ordered(md):
        md.planner_data = collections.OrderedDict(x=1)

    x = _rewrite(src, tmp_path / "ordered-dict", ordered)
    assert native.scan((x / ".metadata").read_bytes()) is None
    assert dcp_fast.fast_equal(x, _copy(x, tmp_path / "ordered-twin")) is None
    assert compare_checkpoints(x, tmp_path / "ordered-twin").passed
    proto2 = _copy(src, tmp_path / "protocol-2")
    md = pickle.loads((proto2 / ".metadata").read_bytes())
    (proto2 / ".metadata").write_bytes(pickle.dumps(md, protocol=2))  # GLOBAL opcodes, not STACK_GLOBAL
    assert native.scan((proto2 / ".metadata").read_bytes()) is None
    assert compare_checkpoints(proto2, src).passed


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_thread_and_no_descriptor_outlives_a_call(saves, tmp_path):
    _, pairs = saves
    a, b = pairs["many"]
    flipped = _copy(b, tmp_path / "flip")
    data = flipped / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    threads, fds = threading.active_count(), _fds()
    for other in (b, flipped, tmp_path / "missing"):
        dcp_fast.fast_equal(a, other)
        assert threading.active_count() == threads and _fds() == fds, other


def test_without_the_native_reader_compare_is_the_python_path(saves, monkeypatch):
    _, pairs = saves
    a, b = pairs["adamw"]
    expected = _json(dcp_fast.fast_equal(a, b))
    monkeypatch.setattr(dcp_fast, "native_reader", lambda: None)
    assert dcp_fast.fast_equal(a, b) is None
    assert _json(compare_checkpoints(a, b)) == expected


FUZZ = textwrap.dedent("""
    import random, shutil, sys
    from pathlib import Path
    from pytest_miles.ckpt import _dcpscan
    from pytest_miles.checks.compare import compare_checkpoints
    from pytest_miles.checks.dcp_fast import fast_equal
    from pytest_miles.errors import CheckpointError
    src, work, rounds, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    sys.path.insert(0, sys.argv[5])
    from fuzz_dcpscan import mutate  # scripts/: the mutations the sanitizer run uses
    good = (src / ".metadata").read_bytes()
    rng = random.Random(seed)
    vouched = taken = 0
    for r in range(rounds):
        m = mutate(rng, good)
        if _dcpscan.scan(m) is None:
            continue
        vouched += 1  # then the whole fast path, against a byte-identical copy: its EQUAL must be the full path's
        d, twin = work / f"m{r}", work / f"m{r}-twin"
        shutil.copytree(src, d)
        (d / ".metadata").write_bytes(bytes(m))
        shutil.copytree(d, twin)
        fast = fast_equal(d, twin)
        if fast is not None:
            taken += 1
            try:
                full = compare_checkpoints(d, twin, fast=False)
            except CheckpointError as exc:
                sys.exit(f"round {r}: the fast path said EQUAL, the full path: {exc}")
            a, b = fast.to_json(), full.to_json()
            a.pop("seconds"), b.pop("seconds")
            if a != b:
                sys.exit(f"round {r}: reports differ: {a} vs {b}")
        shutil.rmtree(d)
        shutil.rmtree(twin)
    print(f"fuzz: {rounds} mutations, {vouched} vouched for by the native reader, {taken} taken by the fast path")
""")


@pytest.mark.timeout(300)
def test_mutated_metadata_never_crashes_and_is_never_vouched_for_wrongly(saves, tmp_path):
    """Random byte mutations of a real `.metadata` (in a child process: a crash would be a signal,
    reported as such): no crash, and wherever the fast path answers EQUAL for a mutated file against
    its copy, the full Python path answers the same report (not an error, not other counts)."""
    _, pairs = saves
    proc = subprocess.run([sys.executable, "-c", FUZZ, str(pairs["adamw"][0]), str(tmp_path), "20000", "14",
                           str(Path(__file__).resolve().parents[2] / "scripts")],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout[-2000:]} {proc.stderr[-3000:]}"
    assert "fuzz: 20000 mutations" in proc.stdout
    taken = int(proc.stdout.split(", ")[-1].split()[0])
    assert taken > 0, proc.stdout  # mutations that stayed valid DCP (other numbers, same shape) were compared


@pytest.mark.timeout(20)
def test_shared_sizes_cost_no_more_than_the_file(tmp_path):
    """One 100,000-dimension Size shared (pickle memo) by 5,000 entries: ~1 MB on disk, 2e9 steps if
    walked naively. Both readers refuse it in a fraction of a second: the native one declines, the
    Python one names the file (exit 2)."""
    import time

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    big, zeros = torch.Size([1] * 100_000), torch.Size([0] * 100_000)
    n = 5000
    sdm = {f"t{i}": TensorStorageMetadata(TensorProperties(dtype=torch.float32), big,
                                          [ChunkStorageMetadata(zeros, big)])
           for i in range(n)}
    storage = {MetadataIndex(f"t{i}"): _StorageInfo("__0_0.distcp", 4 * i, 4) for i in range(n)}
    for index in storage:  # set after hashing (a frozen dataclass would hash 100,000 dimensions): shared
        object.__setattr__(index, "offset", zeros)
    for side in ("a", "b"):
        d = tmp_path / side
        d.mkdir()
        (d / ".metadata").write_bytes(pickle.dumps(Metadata(sdm, storage_data=storage)))
        (d / "__0_0.distcp").write_bytes(bytes(4 * n))
    raw = (tmp_path / "a" / ".metadata").read_bytes()
    assert len(raw) < 2_000_000
    t0 = time.perf_counter()
    assert native.scan(raw) is None
    assert dcp_fast.fast_equal(tmp_path / "a", tmp_path / "b") is None
    with pytest.raises(CheckpointError, match="share sizes/chunks far beyond|share offsets far beyond"):
        compare_checkpoints(tmp_path / "a", tmp_path / "b")
    assert time.perf_counter() - t0 < 15


def test_the_native_reader_can_be_switched_off_and_a_bad_switch_is_named(saves, monkeypatch, capsys):
    _, pairs = saves
    a, b = pairs["plain"]
    for off in ("0", "false", "no"):  # a boolean setting (config/settings.py): its usual spellings
        monkeypatch.setenv("PYTEST_MILES_NATIVE", off)
        assert dcp_fast.native_reader() is None and dcp_fast.fast_equal(a, b) is None, off
    assert compare_checkpoints(a, b).passed
    monkeypatch.setenv("PYTEST_MILES_NATIVE", "1")
    assert dcp_fast.native_reader() is native
    monkeypatch.setenv("PYTEST_MILES_NATIVE", "maybe")
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert ("environment variable PYTEST_MILES_NATIVE: 'maybe' is not a boolean (use 1/0, true/false)" in err
            and "Traceback" not in err), err
    assert main(["compare", "--json", str(a), str(b)]) == 2
    assert "PYTEST_MILES_NATIVE" in json.loads(capsys.readouterr().out)["error"]
    monkeypatch.delenv("PYTEST_MILES_NATIVE")  # a config file that switches it off is read too
    cfg = a.parent / "native-off.toml"
    cfg.write_text("[model]\nnative = false\n")
    monkeypatch.setenv("PYTEST_MILES_CONFIG", str(cfg))
    assert dcp_fast.native_reader() is None


def test_the_native_reader_is_found_without_importing_the_settings():
    """Neither the variable nor a config file set: on, and the settings machinery is not imported (start-up)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_MILES_NATIVE", "PYTEST_MILES_CONFIG")}
    code = ("import sys; from pytest_miles.ckpt.native import native_reader; "
            "assert native_reader() is not None; assert 'pytest_miles.config' not in sys.modules, 'config imported'")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def megatron_runs(tmp_path_factory):
    """Two real megatron-core runs (the project's trainer, tiny model, one step, seed 1234): torch_dist
    saves with Megatron's `.metadata` (its save plans in `all_local_plans`), `common.pt` and
    `metadata.json` beside the `.distcp` file, and the tracker file."""
    pytest.importorskip("megatron.core")
    from pytest_miles.trainers.megatron import MegatronTrainer

    t = tmp_path_factory.mktemp("megatron")
    for side in ("a", "b"):
        MegatronTrainer(seed=1234, timeout=300).train(1, save_dir=t / side)
    return t / "a", t / "b"


@pytest.mark.timeout(400)
def test_real_megatron_saves_take_the_fast_path_with_the_full_paths_report(megatron_runs, tmp_path, capsys):
    a, b = megatron_runs
    it_a, it_b = a / "iter_0000001", b / "iter_0000001"
    assert sorted(p.name for p in it_a.iterdir()) == [".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
    raw = (it_a / ".metadata").read_bytes()
    assert b"all_local_plans" in raw and native.scan(raw) is not None, native.declined_at()
    for x, y in ((a, b), (it_a, it_b), (a, it_b)):  # run dirs (tracker), iteration dirs, one of each
        fast = dcp_fast.fast_equal(x, y)
        assert fast is not None, (x, y)
        full = compare_checkpoints(x, y, fast=False)
        assert full.passed and _json(fast) == _json(full)
    assert main(["compare", str(a), str(b)]) == 0
    printed = capsys.readouterr().out.splitlines()
    expected = compare_checkpoints(a, b, fast=False).render().splitlines()
    assert [x for x in printed if " in " not in x] == [x for x in expected if " in " not in x]

    common = _copy(a, tmp_path / "common")  # an argument changed in common.pt: the full path says which
    payload = torch.load(common / "iter_0000001" / "common.pt", weights_only=False)  # our own file: trusted
    payload["args"]["lr"] = 0.5
    torch.save(payload, common / "iter_0000001" / "common.pt")
    assert dcp_fast.fast_equal(a, common) is None
    assert [d.name for d in compare_checkpoints(a, common).differences] == ["common.pt:args.lr"]
    meta = _copy(a, tmp_path / "meta")
    (meta / "iter_0000001" / "metadata.json").write_text('{"sharded_backend": "other"}')
    assert dcp_fast.fast_equal(a, meta) is None and not compare_checkpoints(a, meta).passed
    flipped = _copy(b, tmp_path / "flipped")
    data = flipped / "iter_0000001" / "__0_0.distcp"
    from pytest_miles.checks.element_diff import _raw_range
    from pytest_miles.ckpt.layouts import load_layout

    name = "model.embedding.word_embeddings.weight"
    entry = load_layout(flipped).entries[name]
    _, offset, _ = _raw_range(entry)  # its elements, inside the item's zip
    blob = bytearray(data.read_bytes())
    blob[offset + 4 * 1000 + 3] ^= 0x10  # element 1000's exponent
    data.write_bytes(bytes(blob))
    assert dcp_fast.fast_equal(a, flipped) is None
    report = compare_checkpoints(a, flipped)
    assert len(report.differences) == 1 and report.first.name == name
    assert report.first.data["differing"] == 1
    assert report.first.data["first_index"] == [1000 // entry.shape[1], 1000 % entry.shape[1]]
    assert _json(report) == _json(compare_checkpoints(a, flipped, fast=False))

    from pytest_miles.checks import element_diff
    from pytest_miles.checks.bits import tensor_diff

    layered = _copy(b, tmp_path / "layered")  # a layer-stacked tensor: one chunk (one DCP item) per layer
    name = "model.decoder.layers.mlp.linear_fc1.weight"
    entry = load_layout(layered).entries[name]
    assert len(entry.chunks) > 1
    _, _, (file, offset, length) = element_diff._chunk_ranges(entry)[-1]
    blob = bytearray(file.read_bytes())
    for k in (5, length // 4 - 1):  # two elements of the last chunk
        blob[offset + 4 * k + 1] ^= 0x01
    file.write_bytes(bytes(blob))
    report = compare_checkpoints(a, layered)
    ea, eb = load_layout(a).entries[name], load_layout(layered).entries[name]
    expected = tensor_diff(name, ea.assemble(), eb.assemble())
    assert [d.name for d in report.differences] == [name] and report.first.data == expected.to_json()
    assert element_diff.element_diff(native, ea, eb) == expected  # from the two elements alone


@pytest.mark.timeout(300)
def test_mutated_megatron_metadata_never_crashes_and_is_never_vouched_for_wrongly(megatron_runs, tmp_path):
    """The differential fuzz of the test above, on Megatron's `.metadata` (save plans included)."""
    a, _ = megatron_runs
    src = tmp_path / "plain"  # the iteration dir without the files beside: the fuzz compares DCP dirs
    src.mkdir()
    for name in (".metadata", "__0_0.distcp"):
        shutil.copy(a / "iter_0000001" / name, src / name)
    proc = subprocess.run([sys.executable, "-c", FUZZ, str(src), str(tmp_path), "6000", "15",
                           str(Path(__file__).resolve().parents[2] / "scripts")],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stdout[-2000:]} {proc.stderr[-3000:]}"
    assert "fuzz: 6000 mutations" in proc.stdout
    assert int(proc.stdout.split(", ")[-1].split()[0]) > 0, proc.stdout
