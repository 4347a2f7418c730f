"""Bitwise checkpoint equality on real checkpoints: torch DCP (gloo, world 1 and 2), safetensors, torch.save."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from pytest_miles import assert_checkpoints_equal, compare_checkpoints  # noqa: E402
from pytest_miles.checks.checkpoints import CheckpointError, build_manifest, write_manifest  # noqa: E402
from tests.helpers.checkpoints import (  # noqa: E402
    flip_bit,
    make_state,
    save_dcp,
    tree_state,
)

W = "decoder.layers.1.mlp.linear_fc1.weight"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_miles.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def dcp_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    a = save_dcp(root / "a", make_state(0), {"step": 3})
    b = save_dcp(root / "b", make_state(0), {"step": 3})
    return a, b


def test_equal_saves_compare_equal_despite_save_ids(dcp_pair):
    a, b = dcp_pair
    assert (a / ".metadata").read_bytes() != (b / ".metadata").read_bytes(), "save ids differ by design"
    before = tree_state(a.parent)
    report = assert_checkpoints_equal(a, b)
    assert report.tensors_compared == len(make_state(0)) + 1
    assert any("save_id and checkpoint_id are ignored" in n for n in report.notes)
    assert tree_state(a.parent) == before, "inputs must never be written"


def test_one_flipped_bit_is_found_and_named(dcp_pair, tmp_path):
    a, _ = dcp_pair
    state = make_state(0)
    state[W] = flip_bit(state[W], 77, bit=3)  # [1, 13] in a [256, 64] tensor
    c = save_dcp(tmp_path / "c", state, {"step": 3})
    report = compare_checkpoints(a, c)
    assert not report.passed and len(report.differences) == 1
    assert report.equal is False and report.to_json()["equal"] is False  # the old name, read-only
    with pytest.raises(AttributeError):
        report.equal = True
    d = report.first
    assert d.name == W and d.kind == "tensor"
    assert d.data["differing"] == 1 and d.data["first_index"] == [1, 13] and d.data["max_ulp"] == 8
    assert d.data["value_a"] != d.data["value_b"]
    with pytest.raises(AssertionError,
                       match=r"decoder\.layers\.1\.mlp\.linear_fc1\.weight: 1 of 16384 elements differ"):
        assert_checkpoints_equal(a, c)


def test_non_tensor_state_is_compared_with_key_path(dcp_pair, tmp_path):
    a, _ = dcp_pair
    c = save_dcp(tmp_path / "c", make_state(0), {"step": 4})
    report = compare_checkpoints(a, c)
    assert [d.detail for d in report.differences] == ["step: 3 vs 4"]


def test_extra_tensor_and_dtype_change(dcp_pair, tmp_path):
    a, _ = dcp_pair
    state = make_state(0)
    state["output_layer.weight"] = torch.ones(4, 4)
    state[W] = state[W].to(torch.float16)
    c = save_dcp(tmp_path / "c", state, {"step": 3})
    kinds = {(d.kind, d.name) for d in compare_checkpoints(a, c).differences}
    assert kinds == {("extra", "output_layer.weight"), ("dtype", W)}


def test_megatron_layout_uses_latest_iteration(tmp_path):
    def megatron_save(root, seed):
        it = save_dcp(root / "iter_0000020", make_state(seed))
        torch.save({"iteration": 20, "args": {"lr": 1e-6, "seed": seed}}, it / "common.pt")
        (it / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
        (root / "latest_checkpointed_iteration.txt").write_text("20")
        return root

    a, b = megatron_save(tmp_path / "run1", 0), megatron_save(tmp_path / "run2", 0)
    report = assert_checkpoints_equal(a, b)
    # the tensors + common.pt's three values (iteration, args.lr, args.seed)
    assert report.kind_a == "megatron/dcp" and report.tensors_compared == len(make_state(0)) + 3
    c = megatron_save(tmp_path / "run3", 1)
    report = compare_checkpoints(a, c)
    assert report.first.name == "embedding.word_embeddings.weight"
    assert "common.pt:args.seed: 0 vs 1" in [d.detail for d in report.differences]


def test_safetensors_sharded_hf_dirs(tmp_path):
    def hf(root, state, split):
        root.mkdir()
        names = list(state)
        shards = {"model-00001-of-00002.safetensors": names[:split], "model-00002-of-00002.safetensors": names[split:]}
        for shard, keys in shards.items():
            save_file({k: state[k].contiguous() for k in keys}, str(root / shard))
        weight_map = {k: shard for shard, keys in shards.items() for k in keys}
        (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        (root / "config.json").write_text(json.dumps({"hidden_size": 64}))
        return root

    a = hf(tmp_path / "a", make_state(0), 4)
    assert_checkpoints_equal(a, hf(tmp_path / "b", make_state(0), 6))  # other shard split: same tensors
    state = make_state(0)
    state[W] = flip_bit(state[W], 5)
    report = compare_checkpoints(a, hf(tmp_path / "c", state, 4))
    assert report.first.name == W and report.first.data["first_index"] == [0, 5]


def test_signed_zero_and_nan_payload_are_bit_differences(tmp_path):
    x = torch.tensor([0.0, float("nan"), 1.0])
    y = torch.tensor([-0.0, 0.0, 1.0])
    y[1] = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)[0]  # another NaN payload
    save_file({"w": x}, str(tmp_path / "a.safetensors"))
    save_file({"w": y}, str(tmp_path / "b.safetensors"))
    d = compare_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors").first
    assert d.data["differing"] == 2 and d.data["first_index"] == [0]
    assert d.data["bits_a"] == "0x00000000" and d.data["bits_b"] == "0x80000000"
    assert d.data["nan_mismatches"] == 1


def test_torch_save_files_with_nested_state(tmp_path):
    def save(path, step, lr):
        torch.save({"model": make_state(0), "optimizer": {"state": {0: {"step": torch.tensor(step)}},
                                                          "param_groups": [{"lr": lr}]},
                    "rng": {"python": (3, tuple(range(5)), None)}}, path)
        return path

    a = save(tmp_path / "a.pt", 10, 1e-6)
    assert_checkpoints_equal(a, save(tmp_path / "b.pt", 10, 1e-6))
    details = [d.detail for d in compare_checkpoints(a, save(tmp_path / "c.pt", 11, 2e-6)).differences]
    assert any(d.startswith("optimizer.state.0.step: 1 of 1 elements differ") for d in details), details
    assert "optimizer.param_groups[0].lr: 1e-06 vs 2e-06" in details


def test_ignore_patterns_are_listed(dcp_pair, tmp_path):
    a, _ = dcp_pair
    c = save_dcp(tmp_path / "c", make_state(0), {"step": 4})
    report = assert_checkpoints_equal(a, c, ignore=["step"])
    assert report.ignored == ["step"] and "ignored by request: step" in report.render()


def test_first_stops_early(dcp_pair, tmp_path):
    a, _ = dcp_pair
    c = save_dcp(tmp_path / "c", make_state(1), {"step": 3})
    full = compare_checkpoints(a, c)
    quick = compare_checkpoints(a, c, first=True)
    assert len(full.differences) > 1 and len(quick.differences) == 1 and quick.stopped_early


# ---- CLI and manifests -----------------------------------------------------------------------


def test_cli_exit_codes_and_json(dcp_pair, tmp_path):
    a, b = dcp_pair
    r = cli("compare", a, b)
    assert r.returncode == 0 and "checkpoints EQUAL" in r.stdout
    c = save_dcp(tmp_path / "c", make_state(1), {"step": 3})
    r = cli("compare", a, c, "--json")
    assert r.returncode == 1
    data = json.loads(r.stdout)
    assert data["equal"] is False and data["first_difference"] == "embedding.word_embeddings.weight"
    r = cli("compare", a, tmp_path / "nope")
    assert r.returncode == 2 and "nope: no such file or directory" in r.stderr


def test_cli_builds_only_the_named_command_with_the_same_result():
    """`pytest-miles compare ...` builds the compare subcommand alone (start-up): the commands it
    knows are the full parser's, and a command line parses to the same namespace either way."""
    import argparse

    from pytest_miles import cli as cli_module

    full = cli_module.build_parser()
    subs = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    assert tuple(subs.choices) == cli_module._COMMANDS
    for argv in (["compare", "a", "b"], ["compare", "a", "b", "--first", "--json", "--ignore", "x*", "--workers", "3"],
                 ["manifest", "d", "-o", "m.json"], ["doctor", "--json"]):
        assert vars(cli_module.build_parser(argv[0]).parse_args(argv)) == vars(full.parse_args(argv)), argv


def test_manifest_round_trip(dcp_pair, tmp_path):
    a, b = dcp_pair
    before = tree_state(a)
    out = tmp_path / "a.manifest.json"
    r = cli("manifest", a, "-o", out)
    assert r.returncode == 0, r.stderr
    manifest = json.loads(out.read_text())
    assert W in manifest["entries"] and "decoder.layers.1" in manifest["layers"]
    assert cli("compare", b, out).returncode == 0
    state = make_state(0)
    state[W] = flip_bit(state[W], 0)
    c = save_dcp(tmp_path / "c", state, {"step": 3})
    r = cli("compare", c, out, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["first_difference"] == W
    assert tree_state(a) == before
    assert build_manifest(a)["entries"] == manifest["entries"]
    with pytest.raises(CheckpointError, match="must not be written inside the checkpoint"):
        write_manifest(a, a / "m.json")


# ---- bad input (more in test_checkpoints_hostile.py) ------------------------------------------


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_truncated_and_corrupt_files_of_other_formats(tmp_path):
    save_file({"w": torch.ones(1000)}, str(tmp_path / "a.safetensors"))
    shutil.copy(tmp_path / "a.safetensors", tmp_path / "t.safetensors")
    _truncate(tmp_path / "t.safetensors", 2000)
    with pytest.raises(CheckpointError, match=r"t\.safetensors: truncated: tensor 'w'"):
        compare_checkpoints(tmp_path / "a.safetensors", tmp_path / "t.safetensors")
    (tmp_path / "h.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=r"h\.safetensors: corrupt safetensors header"):
        compare_checkpoints(tmp_path / "a.safetensors", tmp_path / "h.safetensors")
    torch.save({"w": torch.ones(1000)}, tmp_path / "a.pt")
    shutil.copy(tmp_path / "a.pt", tmp_path / "t.pt")
    _truncate(tmp_path / "t.pt", 500)
    with pytest.raises(CheckpointError, match=r"t\.pt: corrupt or truncated torch file"):
        compare_checkpoints(tmp_path / "a.pt", tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="compare like with like"):
        compare_checkpoints(tmp_path / "a.pt", tmp_path / "a.safetensors")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(dcp_pair, tmp_path):
    a, _ = dcp_pair
    x = shutil.copytree(a, tmp_path / "x")
    (x / "__0_0.distcp").chmod(0)
    with pytest.raises(CheckpointError, match="permission denied"):
        compare_checkpoints(a, x)


def test_failure_under_pytest_shows_the_report(pytester, dcp_pair, tmp_path):
    a, _ = dcp_pair
    state = make_state(0)
    state[W] = flip_bit(state[W], 77, 3)
    c = save_dcp(tmp_path / "c", state, {"step": 3})
    pytester.makepyfile(f"""
        from pytest_miles import assert_checkpoints_equal

        def test_runs_match():
            assert_checkpoints_equal({str(a)!r}, {str(c)!r})
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*first difference in checkpoint order: decoder.layers.1.mlp.linear_fc1.weight*",
                                 "*first at [[]1, 13[]]*max ULP distance 8*"])
