"""Damaged checkpoints of every kind, seeded: whatever the damage, `compare` and `manifest` answer (equal,
different) or exit 2 with one line naming the damaged checkpoint; never a stray Python exception.

test_checkpoints_hostile.py holds the cases chosen by hand; this file flips, zeroes, sets and truncates bytes
anywhere in each file of a real checkpoint (headers, ends, pickles, tensor bytes), the way a bad disk or an
interrupted copy does. A damaged file that still parses is a file: answering for it is right (torch.load reads
it the same way: it checks no CRC either, pytorch/pytorch#28858)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from pytest_miles.cli import main  # noqa: E402
from tests.helpers.checkpoints import make_state, save_dcp, save_hf, save_legacy_megatron, tree_state  # noqa: E402

KINDS = ("dcp", "hf", "legacy", "pt", "st")
DAMAGES = 120  # per kind: about 2 s each on the 2-core CI runner, found both leaks fixed in ckpt/torch_save.py


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    t = tmp_path_factory.mktemp("damaged-good")
    state = make_state(0, layers=2, hidden=16)
    kinds = {"dcp": save_dcp(t / "dcp", state, {"step": 3}), "hf": save_hf(t / "hf", state, 3),
             "legacy": save_legacy_megatron(t / "legacy", 10, state)}
    torch.save({"model": state, "step": 3}, t / "model.pt")
    save_file({"w": torch.ones(16), "b": torch.arange(8, dtype=torch.int64)}, str(t / "model.safetensors"))
    return {**kinds, "pt": t / "model.pt", "st": t / "model.safetensors"}


def _damage(rng: random.Random, data: bytearray) -> bytearray:
    """Truncated somewhere, or 1 to 4 bytes changed: near the start (headers), near the end (zip directories,
    end records) or anywhere."""
    if rng.random() < 0.15:
        return data[:rng.randrange(len(data))]
    for _ in range(rng.choice((1, 1, 2, 4))):
        edge = min(len(data), 300)
        at = rng.choice((rng.randrange(len(data)), rng.randrange(edge), len(data) - 1 - rng.randrange(edge)))
        data[at] = rng.choice((rng.randrange(256), data[at] ^ 1, data[at] ^ 0x40, data[at] ^ 0x80, 0, 0xFF))
    return data


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_checkpoints_are_answered_or_named(good, kind, tmp_path, capsys):
    g = good[kind]
    files = [g] if g.is_file() else sorted(p for p in g.rglob("*") if p.is_file())
    rng = random.Random(f"damaged-{kind}")
    before = tree_state(g.parent)
    outcomes: dict[int, int] = {}
    for k in range(DAMAGES):
        bad = tmp_path / f"bad{k}{g.suffix}"
        (shutil.copytree if g.is_dir() else shutil.copy)(g, bad)
        victim = rng.choice(files)
        target = bad / victim.relative_to(g) if g.is_dir() else bad
        target.write_bytes(bytes(_damage(rng, bytearray(target.read_bytes()))))
        manifest = tmp_path / f"bad{k}.manifest.json"
        for args in (["compare", str(g), str(bad)], ["compare", "--first", str(bad), str(g)],
                     ["compare", "--json", str(bad), str(bad)], ["manifest", str(bad), "-o", str(manifest)]):
            rc = main(args)
            out, err = capsys.readouterr()
            where = f"{' '.join(args)} after damaging {victim.name} ({k})"
            assert rc in (0, 1, 2), (where, rc, err)
            assert "--debug shows the traceback" not in err and "Traceback" not in err, (where, err)
            if rc == 2 and args[0] == "compare" and "--json" not in args:  # one line, naming the checkpoint
                assert err.count("\n") == 1 and str(bad) in err, (where, err)
            outcomes[rc] = outcomes.get(rc, 0) + 1
        shutil.rmtree(bad) if bad.is_dir() else bad.unlink()
    # not vacuous: damage both refused (exit 2) and read through (equal or different) for every kind
    assert outcomes.get(2, 0) and outcomes.get(0, 0) + outcomes.get(1, 0), outcomes
    assert tree_state(g.parent) == before, "the good checkpoints must never be written"


def test_a_manifest_given_first_says_it_goes_second(good, tmp_path, capsys):
    manifest = tmp_path / "dcp.manifest.json"
    assert main(["manifest", str(good["dcp"]), "-o", str(manifest)]) == 0
    capsys.readouterr()
    assert main(["compare", str(good["dcp"]), str(manifest)]) == 0
    capsys.readouterr()
    assert main(["compare", str(manifest), str(good["dcp"])]) == 2
    assert capsys.readouterr().err == (f"pytest-miles compare: {manifest}: a checkpoint manifest is read as the "
                                       f"second argument only: compare CHECKPOINT {manifest}, with the checkpoint "
                                       "first\n")
