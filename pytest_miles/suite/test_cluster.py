"""Many workers: the deterministic environment reaches every Ray worker, and every worker
computes the same bits (the user's cluster with --miles-ray-address, else a local head)."""

from __future__ import annotations

from pytest_miles import (
    assert_env_propagated,
    deterministic_env_vars,
    disagreement_report,
    run_on_every_worker,
    tiny_forward_logprobs,
)
from pytest_miles.suite.conftest import require


def test_env_propagated_to_every_worker(ray_cluster, miles_record):
    results = assert_env_propagated(ray_cluster)
    miles_record("deterministic env reaches every Ray worker", kind="setup", workers=len(results),
                 nodes=", ".join(sorted({r.node.label for r in results})))


def test_same_bits_on_every_worker(ray_cluster, miles_record):
    require("torch", "torch")
    results = run_on_every_worker(ray_cluster, tiny_forward_logprobs, per_gpu=ray_cluster.gpus() > 0,
                                  runtime_env={"env_vars": deterministic_env_vars()})
    report = disagreement_report(results, "tiny model forward")
    miles_record("same logprobs on every Ray worker", workers=len(results), agree=report is None)
    if report is not None:
        raise AssertionError(report)
