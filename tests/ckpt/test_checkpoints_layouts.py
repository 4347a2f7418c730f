"""The weights, not how they were written: real megatron-core TP 1 vs TP 2 and DCP replicated vs
FSDP2-sharded saves (2 gloo ranks), legacy Megatron dirs, safetensors shard splits and file names,
.pt files with different names; --ignore, --first, --workers, manifests with chunk digests, and
the first diverging iteration of two runs."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from pytest_miles import assert_checkpoints_equal, compare_checkpoints  # noqa: E402
from pytest_miles.checks.checkpoints import CheckpointError, write_manifest  # noqa: E402
from pytest_miles.checks.iterations import first_diverging_iteration  # noqa: E402
from pytest_miles.cli import main  # noqa: E402
from tests.helpers.checkpoints import (  # noqa: E402
    flip_bit,
    make_state,
    save_dcp,
    save_hf,
    save_legacy_megatron,
    tree_state,
)

W = "decoder.layers.1.mlp.linear_fc1.weight"


def test_parallel_layouts_compare_assembled_or_streamed(tmp_path, request):
    """One test (one 2-rank launch, shared with test_dcp_native and test_front: `parallel_layouts`,
    tests/ckpt/conftest.py): megatron-core TP 1 vs TP 2, DCP replicated vs FSDP2-sharded, a flipped bit
    found at its global index, and a reordered shard file set."""
    pytest.importorskip("megatron.core")
    parallel = request.getfixturevalue("parallel_layouts")
    before = tree_state(parallel)
    report = assert_checkpoints_equal(parallel / "megatron-tp1", parallel / "megatron-tp2")
    assert any("chunk layouts differed for 2 tensor(s)" in n for n in report.notes), report.notes
    assert report.tensors_compared >= 3
    report = compare_checkpoints(parallel / "megatron-tp1", parallel / "megatron-tp2-flip")
    d = report.first
    assert len(report.differences) == 1 and d.name == "model.decoder.layers.0.mlp.linear_fc2.weight"
    assert d.data["differing"] == 1 and d.data["first_index"] == [3, 37] and d.data["max_ulp"] == 1
    report = compare_checkpoints(parallel / "megatron-tp2", parallel / "megatron-tp2-flip")  # same layout
    assert not any("chunk layouts differed" in n for n in report.notes)
    assert report.first.name == d.name and report.first.data["first_index"] == [3, 37], "global index"

    report = assert_checkpoints_equal(parallel / "dtensor-replicated", parallel / "fsdp2-sharded")
    assert report.tensors_compared == 2 and any("chunk layouts differed" in n for n in report.notes)

    a = parallel / "fsdp2-sharded"
    assert sorted(p.name for p in a.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # Swap the two shard files and rewrite .metadata to match: same tensors, reordered file set.
    b = shutil.copytree(a, tmp_path / "b")
    md = pickle.loads((b / ".metadata").read_bytes())  # our own file: trusted here
    swap = {"__0_0.distcp": "__1_0.distcp", "__1_0.distcp": "__0_0.distcp"}
    for info in md.storage_data.values():
        info.relative_path = swap[info.relative_path]
    os.rename(b / "__0_0.distcp", b / "tmp")
    os.rename(b / "__1_0.distcp", b / "__0_0.distcp")
    os.rename(b / "tmp", b / "__1_0.distcp")
    (b / ".metadata").write_bytes(pickle.dumps(md))
    report = assert_checkpoints_equal(a, b)
    assert any("storage placement differs" in n for n in report.notes), "the layout difference is reported"
    assert tree_state(parallel) == before


def test_legacy_megatron_layout_from_run_iteration_and_file(tmp_path):
    state = make_state(0, layers=4, hidden=16)
    a = save_legacy_megatron(tmp_path / "a", 20, state, tp=2, pp=2)
    b = save_legacy_megatron(tmp_path / "b", 20, state, tp=2, pp=2)
    report = assert_checkpoints_equal(a, b)
    assert report.kind_a == "megatron-legacy" and "legacy ranks" not in " ".join(report.notes)
    assert any(k.startswith("mp_rank_01_001/model_optim_rng.pt:model.") for k in
               __import__("pytest_miles.ckpt.layouts", fromlist=["x"]).load_layout(a).entries)
    assert_checkpoints_equal(a / "iter_0000020", b / "iter_0000020")
    f = "iter_0000020/mp_rank_01_001/model_optim_rng.pt"
    assert_checkpoints_equal(a / f, b / f)
    state2 = dict(state)
    state2["decoder.layers.1.mlp.linear_fc1.weight"] = flip_bit(state2["decoder.layers.1.mlp.linear_fc1.weight"], 3)
    c = save_legacy_megatron(tmp_path / "c", 20, state2, tp=2, pp=2)
    report = compare_checkpoints(a, c)
    assert report.first.name == "mp_rank_00_001/model_optim_rng.pt:model.decoder.layers.1.mlp.linear_fc1.weight"
    assert report.first.data["first_index"] == [0, 3]


def test_safetensors_shard_split_and_file_names_do_not_matter(tmp_path):
    state = make_state(0)
    a = save_hf(tmp_path / "a", state, 4, metadata={"format": "pt"})
    assert_checkpoints_equal(a, save_hf(tmp_path / "b", state, 7, metadata={"format": "pt"}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "A.safetensors"), {"format": "pt"})
    shutil.copy(tmp_path / "A.safetensors", tmp_path / "B.safetensors")
    assert_checkpoints_equal(tmp_path / "A.safetensors", tmp_path / "B.safetensors")
    report = compare_checkpoints(a, save_hf(tmp_path / "c", state, 4, metadata={"format": "mlx"}))
    assert [d.kind for d in report.differences] == ["metadata"]


def test_pt_files_with_different_names_stream_by_tensor(tmp_path):
    state = {"model": make_state(0), "step": 7, "lr": 1e-4}
    torch.save(state, tmp_path / "model_a.pt")
    torch.save(state, tmp_path / "model_b.pt")
    report = assert_checkpoints_equal(tmp_path / "model_a.pt", tmp_path / "model_b.pt")
    nbytes = sum(t.numel() * t.element_size() for t in state["model"].values())
    assert report.bytes_compared == 2 * nbytes, "tensors are compared as byte ranges, not decoded"
    state["model"][W] = flip_bit(state["model"][W], 9)
    torch.save(state, tmp_path / "model_c.pt")
    assert compare_checkpoints(tmp_path / "model_a.pt", tmp_path / "model_c.pt").first.name == f"model.{W}"


class TrainerConfig:
    """A user's own class inside a checkpoint: outside the allow-list, so the file is refused by name
    (a stand-in would compare only what the pickle says, never what the class would rebuild)."""

    def __init__(self, lr: float) -> None:
        self.lr = lr


def test_unknown_classes_make_the_file_refused_by_name(tmp_path):
    torch.save({"w": torch.ones(3), "config": TrainerConfig(1e-4)}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"a\.pt: refused: .* class \S*TrainerConfig, outside the allow-list"):
        compare_checkpoints(tmp_path / "a.pt", tmp_path / "a.pt")


def test_ignore_matches_printed_names_and_reports_unmatched(tmp_path, capsys):
    state = {"layer.0.bias": torch.zeros(4), "layer.0.weight": torch.ones(4, 4)}
    torch.save(state, tmp_path / "model.pt")
    (tmp_path / "b").mkdir()
    torch.save({**state, "layer.0.bias": torch.ones(4)}, tmp_path / "b" / "model.pt")
    report = compare_checkpoints(tmp_path / "model.pt", tmp_path / "b" / "model.pt", ignore=["layer.0.bias", "nope*"])
    assert report.passed and report.ignored_unmatched == ["nope*"]
    assert main(["compare", str(tmp_path / "model.pt"), str(tmp_path / "b" / "model.pt"), "--ignore", "nope*"]) == 1
    out = capsys.readouterr().out
    assert "- [tensor] layer.0.bias:" in out and "ignore pattern(s) that matched nothing: nope*" in out


def test_nothing_compared_is_not_equal(tmp_path, capsys):
    """Everything ignored, or nothing on either side: exit 2 saying so, never a vacuous EQUAL."""
    state = {"layer.0.bias": torch.zeros(4), "layer.0.weight": torch.ones(4, 4)}
    torch.save(state, tmp_path / "a.pt")
    torch.save({k: v + 1 for k, v in state.items()}, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match=r"nothing was compared \(every entry matched --ignore 'layer\.\*'\)"):
        compare_checkpoints(tmp_path / "a.pt", tmp_path / "b.pt", ignore=["layer.*"])
    assert main(["compare", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--ignore", "layer.*"]) == 2
    assert "nothing was compared" in capsys.readouterr().err


def test_first_stops_within_one_file_pair(tmp_path):
    state = {f"t{i:03d}": torch.full((256,), float(i)) for i in range(200)}
    save_file(state, str(tmp_path / "a.safetensors"))
    state = {k: v + 1 for k, v in state.items()}
    save_file(state, str(tmp_path / "b.safetensors"))
    full = compare_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    quick = compare_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors", first=True)
    assert len(full.differences) == 200 and len(quick.differences) == 1 and quick.stopped_early
    assert quick.first.name == "t000" and quick.tensors_compared == 1


def test_workers_must_be_at_least_one(tmp_path, capsys):
    save_file({"w": torch.ones(4)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError, match="--workers 0: expected a whole number >= 1"):
        compare_checkpoints(tmp_path / "a.safetensors", tmp_path / "a.safetensors", workers=0)
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"), "--workers", "0"])
    assert exc.value.code == 2 and "--workers: 0: expected a whole number >= 1" in capsys.readouterr().err


def test_manifest_beside_not_inside_and_chunk_ranges(tmp_path, capsys):
    big = torch.arange(3 * 2**20, dtype=torch.float32)
    a = tmp_path / "A"
    a.mkdir()
    torch.save({"w": big, "b": torch.ones(3)}, a / "model.pt")
    twin = tmp_path / "B"
    shutil.copytree(a, twin)
    before = tree_state(a)
    assert main(["manifest", str(a / "model.pt")]) == 0
    out = tmp_path / "A.model.pt.manifest.json"
    assert f"wrote {out}" in capsys.readouterr().out and tree_state(a) == before
    assert_checkpoints_equal(a, twin)  # the manifest did not land in A
    nested = tmp_path / "new" / "dir" / "m.json"
    assert write_manifest(a, nested) == nested and nested.exists()
    with pytest.raises(CheckpointError, match="must not be written inside the checkpoint"):
        write_manifest(a / "model.pt", a / "m.json")
    big[2**20 + 5] += 1
    torch.save({"w": big, "b": torch.ones(3)}, twin / "model.pt")
    assert main(["compare", str(twin / "model.pt"), str(out), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["first_difference"] == "w"
    assert data["differences"][0]["diff"] == {"chunk": 1, "elements": [2**20, 2**21]}
    assert "elements [1048576, 2097152)" in data["differences"][0]["detail"]


def _run(root, seeds):
    """A run dir with an iteration dir per {iteration: seed} (seed decides the weights)."""
    for it, seed in seeds.items():
        save_dcp(root / f"iter_{it:07d}", make_state(seed, layers=1, hidden=16), {"iteration": it})
    (root / "latest_checkpointed_iteration.txt").write_text(str(max(seeds)))
    return root


def test_first_diverging_iteration_walk_and_cli(tmp_path, capsys):
    a = _run(tmp_path / "a", {2: 0, 4: 1, 6: 2, 8: 3})
    b = _run(tmp_path / "b", {2: 0, 4: 1, 6: 9, 10: 4})
    walk = first_diverging_iteration(a, b)
    assert walk.compared == [2, 4, 6] and walk.first_diverging == 6 and walk.only_a == [8] and walk.only_b == [10]
    assert walk.first_tensor == "embedding.word_embeddings.weight"
    text = walk.render()
    assert "first diverging iteration 6" in text and "Flash-Attention 3" in text and "B only: 10" in text
    with pytest.raises(AssertionError, match="first diverging iteration 6, first differing tensor embedding"):
        assert_checkpoints_equal(a, b, iterations="all")
    assert main(["compare", str(a), str(b), "--iterations", "all", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["first_diverging_iteration"] == 6 and data["iterations_compared"] == [2, 4, 6]
    assert assert_checkpoints_equal(a, _run(tmp_path / "c", {2: 0, 4: 1}), iterations="all").compared == [2, 4]
    assert main(["compare", str(a / "iter_0000002"), str(b), "--iterations", "all"]) == 2
    assert "no iter_XXXXXXX/ directories" in capsys.readouterr().err


def test_departing_run_option_is_validated():
    """data_seed_from_step=(iteration, seed): the knob the GPU first-diverging-iteration test uses."""
    from pytest_miles.trainers.megatron import MegatronTrainer, TrainerError

    assert MegatronTrainer(data_seed_from_step=(3, 99)).data_seed_from_step == [3, 99]
    for bad in ((0, 1), (3,), ("3", 1), (True, 1), 3):
        with pytest.raises(TrainerError, match=r"data_seed_from_step .*: expected \(iteration >= 1, data seed\)"):
            MegatronTrainer(data_seed_from_step=bad)
