"""Records made on the GPU host (committed under fixtures/snapshots/) and compared wherever
the suite runs: on the same configuration they must match bit for bit; on another (this CPU
machine) the outcome is "different configuration" with the differing fields and causes."""

from __future__ import annotations

import pytest

from pytest_miles.checks.checkpoints import build_manifest
from pytest_miles.engines.base import SamplingParams

pytestmark = pytest.mark.slow
PROMPT = [5, 17, 42, 99, 7, 3, 250, 11]


def test_rollout_tokens_and_logprobs(engine, determinism_snapshot):
    outs = engine.generate([PROMPT] * 4, SamplingParams(temperature=1.0, max_new_tokens=16, sampling_seed=42))
    determinism_snapshot.check("tokens", [o.output_ids for o in outs])
    determinism_snapshot.check("logprobs", [o.logprobs for o in outs])


def test_megatron_manifest_and_losses(megatron_trainer_factory, tmp_path, determinism_snapshot):
    run = megatron_trainer_factory(seed=1234).train(4, save_dir=tmp_path / "run")
    manifest = build_manifest(run.checkpoint())
    model = {k: v for k, v in manifest["entries"].items() if k.startswith("model.")}
    determinism_snapshot.check("model manifest", model)
    determinism_snapshot.check("losses", run.losses)
