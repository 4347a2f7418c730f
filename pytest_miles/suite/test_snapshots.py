"""Snapshot comparison: this stack's rollout and training bits against the records kept for it
(under --miles-snapshot-dir; written with --miles-snapshot-update and committed)."""

from __future__ import annotations

import pytest

from pytest_miles import SamplingParams
from pytest_miles.suite.conftest import engine_for, require

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11]


def _need_records(snap, names):
    if not snap.updating and not any(snap.recorded(n) for n in names):
        pytest.skip(f"no snapshot records for this suite under {snap.store.root} (write them on this stack with "
                    "`pytest-miles suite --miles-snapshot-update`, then commit them)")


def test_rollout_matches_snapshot(engine_factory, miles_settings, determinism_snapshot, miles_record):
    require("torch", "torch")
    _need_records(determinism_snapshot, ["tokens", "logprobs"])
    engine = engine_for("deterministic", engine_factory, miles_settings)
    outs = engine.generate([PROMPT] * 4, SamplingParams(temperature=1.0, max_new_tokens=16, sampling_seed=42))
    determinism_snapshot.check("tokens", [o.output_ids for o in outs])
    determinism_snapshot.check("logprobs", [o.logprobs for o in outs])
    miles_record(f"rollout matches its snapshot ({engine.name})", tokens=sum(len(o.output_ids) for o in outs))


def test_training_matches_snapshot(megatron_trainer_factory, determinism_snapshot, tmp_path, miles_record):
    require("megatron.core", "megatron")
    _need_records(determinism_snapshot, ["losses", "model manifest"])
    from pytest_miles import build_manifest

    run = megatron_trainer_factory(seed=1234).train(4, save_dir=tmp_path / "run")
    manifest = build_manifest(run.checkpoint())
    determinism_snapshot.check("losses", run.losses)
    determinism_snapshot.check("model manifest",
                               {k: v for k, v in manifest["entries"].items() if k.startswith("model.")})
    miles_record(f"training matches its snapshot ({run.device})", steps=len(run.losses))
