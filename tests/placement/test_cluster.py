"""A real local Ray cluster (a head and a second raylet with its own resources and environment):
environment propagation, per-worker comparison, engines and trainer ranks as actors, bad input."""

from __future__ import annotations

import json
import socket

import psutil
import pytest

pytest.importorskip("ray")

from pytest_miles import assert_env_propagated, assert_same_across_workers, run_on_every_worker  # noqa: E402
from pytest_miles.facts.environment import deterministic_env_vars  # noqa: E402
from pytest_miles.placement import probes  # noqa: E402
from pytest_miles.placement.ray_cluster import ClusterError, RayCluster  # noqa: E402
from pytest_miles.scenarios.workers import disagreement_report  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def second_node(miles_ray_session):
    """Node B: a second raylet on this machine, like a second machine whose shell exported the
    wrong NCCL_ALGO (a real misconfiguration the seed's troubleshooting table names)."""
    return miles_ray_session.add_node(num_cpus=1, resources={"miles_node_b": 1}, env={"NCCL_ALGO": "Tree"})


def _node_b_only(node_b, runtime_env):
    return lambda node: runtime_env if node.node_id == node_b.node_id else {"env_vars": deterministic_env_vars()}


def test_the_cluster_has_two_nodes_and_a_task_pinned_to_each(ray_cluster, second_node):
    results = run_on_every_worker(ray_cluster, probes.identity)
    assert len(results) == 2
    assert {r.identity["node_id"] for r in results} == {n.node_id for n in ray_cluster.nodes()}
    for r in results:
        assert r.ok and r.value["node_id"] == r.node.node_id, "each task ran on the node it was pinned to"
    labels = " ".join(r.label for r in results)
    assert second_node.node_id[:8] in labels and "head" in labels and "miles_node_b" in labels


def test_env_propagated_through_runtime_env_passes_on_every_node(ray_cluster, second_node):
    results = assert_env_propagated(ray_cluster)
    assert len(results) == 2
    for r in results:
        assert r.value == deterministic_env_vars()


def test_a_worker_whose_runtime_env_lacks_nccl_algo_is_named(ray_cluster, second_node):
    env = {k: v for k, v in deterministic_env_vars().items() if k != "NCCL_ALGO"}
    with pytest.raises(AssertionError) as info:
        assert_env_propagated(ray_cluster, runtime_env=_node_b_only(second_node, {"env_vars": env}))
    msg = str(info.value)
    assert "did not reach 1 of 2 Ray workers" in msg
    assert f"node {second_node.node_id[:8]}" in msg and "miles_node_b" in msg
    assert "NCCL_ALGO='Tree' (expected 'Ring')" in msg, "node B's own shell value leaks through"
    assert "head" not in msg.split("failure:")[1], "the head got the full env and is not blamed"


def test_jobs_without_runtime_env_rely_on_each_machines_shell(ray_cluster, second_node):
    with pytest.raises(AssertionError) as info:
        assert_env_propagated(ray_cluster, runtime_env=None)
    msg = str(info.value)
    assert "NCCL_ALGO='Tree'" in msg and "CUBLAS_WORKSPACE_CONFIG unset" in msg


def test_same_deterministic_computation_agrees_on_every_worker(ray_cluster, second_node):
    env = {"env_vars": deterministic_env_vars()}
    for fn, args in ((probes.matmul_digest, (3,)), (probes.tiny_forward_logprobs, ())):
        results = run_on_every_worker(ray_cluster, fn, *args, runtime_env=env)
        assert_same_across_workers(results, fn.__name__)
        assert all(r.fingerprint.get("digest") for r in results), "each worker sent its fingerprint"


def skewed_logprobs():
    """NEGATIVE CONTROL: a computation made to differ on the node whose NCCL_ALGO is wrong."""
    import os

    from pytest_miles.placement.probes import tiny_forward_logprobs

    out = tiny_forward_logprobs()
    if os.environ.get("NCCL_ALGO") != "Ring":
        out[17] = float.fromhex(out[17].hex()) + 2**-20
    return out


def test_a_worker_made_to_differ_is_pinpointed_with_its_fingerprint(ray_cluster, second_node):
    results = run_on_every_worker(ray_cluster, skewed_logprobs,
                                  runtime_env=_node_b_only(second_node, {"env_vars": {}}))
    with pytest.raises(AssertionError) as info:
        assert_same_across_workers(results, "skewed_logprobs")
    msg = str(info.value)
    assert f"DIFFERS: node {second_node.node_id[:8]}" in msg
    assert "first difference at [17]" in msg
    assert "env.NCCL_ALGO Ring -> Tree" in msg and "not propagated" in msg, msg


def die_on_node_b():
    import os

    if os.environ.get("NCCL_ALGO") == "Tree":
        os._exit(3)
    return "alive"


def test_a_worker_that_dies_is_reported_by_node(ray_cluster, second_node):
    results = run_on_every_worker(ray_cluster, die_on_node_b, timeout=60,
                                  runtime_env=_node_b_only(second_node, None))
    failed = [r for r in results if not r.ok]
    assert len(failed) == 1 and failed[0].node.node_id == second_node.node_id
    assert "worker died" in failed[0].error
    report = disagreement_report(results, "die_on_node_b")
    assert f"FAILED: node {second_node.node_id[:8]}" in report


DIES_AS_IT_STARTS = """
import pytest
from pytest_miles import assert_env_propagated
from pytest_miles.facts.environment import deterministic_env_vars

def test_probe(ray_cluster, tmp_path):
    node_b = ray_cluster.add_node(num_cpus=1, resources={"miles_node_b": 1})
    # NEGATIVE CONTROL: node B's runtime_env puts a sitecustomize that exits on PYTHONPATH.
    (tmp_path / "sitecustomize.py").write_text("import os\\nos._exit(3)\\n")
    good = {"env_vars": deterministic_env_vars()}
    broken = {"env_vars": {**deterministic_env_vars(), "PYTHONPATH": str(tmp_path)}}
    with pytest.raises(AssertionError) as info:
        assert_env_propagated(ray_cluster, runtime_env=lambda n: broken if n.node_id == node_b.node_id else good,
                              timeout=15)
    msg = str(info.value)
    assert "did not reach 1 of 2" in msg and f"node {node_b.node_id[:8]}" in msg and "no answer within 15 s" in msg


def test_the_node_added_by_a_test_is_gone_after_it(ray_cluster):
    assert len(ray_cluster.nodes()) == 1, ray_cluster.nodes()
"""


@pytest.mark.slow
def test_a_worker_that_dies_as_it_starts_fails_the_probe_in_bounded_time(pytester):
    # In its own session: Ray keeps retrying to start that worker, which would slow later tests.
    pytester.makepyfile(DIES_AS_IT_STARTS)
    result = pytester.runpytest_subprocess("-p", "no:randomly", timeout=200)
    result.assert_outcomes(passed=2)


def test_engine_as_ray_actor_matches_the_local_engine(ray_cluster, tiny_model_dir, tmp_path):
    from pytest_miles import assert_batch_invariant
    from pytest_miles.engines.base import SamplingParams
    from pytest_miles.engines.factory import EngineSpec, make_engine
    from pytest_miles.engines.ray import RayEngine

    spec = EngineSpec("reference", str(tiny_model_dir), True, "flashinfer", (), {}, "cpu", str(tmp_path), 60.0)
    params = SamplingParams(max_new_tokens=6, sampling_seed=3)
    with RayEngine(ray_cluster, spec) as remote, make_engine(spec) as local:
        assert remote.where["node_id"] in {n.node_id for n in ray_cluster.nodes()}
        prompts = [[5, 6, 7, 8], [9, 10]]
        assert remote.generate(prompts, params) == local.generate(prompts, params)
        assert_batch_invariant(remote, mode="single", trials=2)
    assert not remote.alive


def test_megatron_ranks_as_ray_actors_match_local_ranks(ray_cluster, tmp_path):
    pytest.importorskip("megatron.core")
    from pytest_miles import assert_runs_bitwise_equal
    from pytest_miles.trainers.megatron import MegatronTrainer
    from pytest_miles.trainers.ray import RayRankLauncher

    launcher = RayRankLauncher(ray_cluster)
    on_ray = MegatronTrainer(tensor_parallel=2, launcher=launcher, log_dir=tmp_path / "ray").train(
        2, save_dir=tmp_path / "ckpt-ray")
    assert len(launcher.placements) == 2, "one actor per rank"
    local = MegatronTrainer(tensor_parallel=2, log_dir=tmp_path / "local").train(2, save_dir=tmp_path / "ckpt-local")
    assert_runs_bitwise_equal(on_ray, local)


# ---- bad input -----------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_is_a_clear_error():
    port = _closed_port()
    with pytest.raises(ClusterError, match=rf"--miles-ray-address '127.0.0.1:{port}': cannot reach the Ray GCS"):
        RayCluster.connect(f"127.0.0.1:{port}", timeout=5)
    with pytest.raises(ClusterError, match="expected host:port"):
        RayCluster.connect("not-an-address", timeout=5)


def test_unreachable_address_fails_the_session_with_the_option_named(pytester):
    pytester.makepyfile("def test_cluster(ray_cluster):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", f"--miles-ray-address=127.0.0.1:{_closed_port()}",
                                           timeout=120)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--miles-ray-address '127.0.0.1:*': cannot reach the Ray GCS*"])


LEAK_CHECK = """
import json, os, pytest
from pytest_miles import assert_env_propagated

def test_probe(ray_cluster):
    assert len(assert_env_propagated(ray_cluster)) == 1
    with open(os.environ["MILES_TEST_RECORD"], "w") as f:
        json.dump({"pids": ray_cluster.pids(), "temp": str(ray_cluster._temp_dir)}, f)

@pytest.mark.ray_gpus(1)
def test_needs_a_gpu_on_the_cluster(ray_cluster):
    raise AssertionError("must be skipped on a cluster without GPUs")

def test_engine_on_ray(engine):
    assert engine.name == "reference@ray"
    assert engine.generate([[5, 6, 7]])[0].output_ids

def test_fails_with_the_cluster_up(ray_cluster):
    assert False, "a failing test must not leak the cluster"
"""


@pytest.mark.slow
def test_local_head_is_shut_down_after_the_session_even_when_a_test_fails(pytester, monkeypatch):
    record = pytester.path / "record.json"
    monkeypatch.setenv("MILES_TEST_RECORD", str(record))
    pytester.makepyfile(LEAK_CHECK)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-rs", "--miles-placement=ray", timeout=240)
    result.assert_outcomes(passed=2, failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*requires 1 GPU(s) on the Ray cluster at 127.0.0.1:*; it has 0 (node *: 0 GPU)*"])
    seen = json.loads(record.read_text())
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and any(seen["temp"] in part for part in p.info["cmdline"])]
    assert left == [], f"ray processes of the session left behind: {left}"
    assert not any(psutil.pid_exists(p) for p in seen["pids"])


def test_malformed_runtime_env_and_env_are_named_and_left_untouched(ray_cluster):
    runtime_env = {"env_vars": {"NCCL_ALGO": "Ring", "MILES_STEPS": 4}}
    snapshot = {"env_vars": dict(runtime_env["env_vars"])}
    with pytest.raises(ClusterError,
                       match=r"runtime_env\['env_vars'\]\['MILES_STEPS'\] for node .*: 4 is not a string"):
        run_on_every_worker(ray_cluster, probes.identity, runtime_env=runtime_env)
    assert runtime_env == snapshot
    with pytest.raises(ClusterError, match=r"runtime_env\['env_vars'\] for node .*: expected a dict, got list"):
        run_on_every_worker(ray_cluster, probes.identity, runtime_env={"env_vars": ["NCCL_ALGO=Ring"]})
    env = {"NCCL_ALGO": None}
    with pytest.raises(ValueError, match=r"assert_env_propagated: env\['NCCL_ALGO'\] = None is not a string"):
        assert_env_propagated(ray_cluster, env)
    assert env == {"NCCL_ALGO": None}
    if ray_cluster.gpus() == 0:
        with pytest.raises(ClusterError, match=r"per_gpu=True, but no node of the Ray cluster at .* has a GPU"):
            run_on_every_worker(ray_cluster, probes.identity, per_gpu=True)


def test_empty_results_and_foreign_clusters_are_refused():
    with pytest.raises(ValueError, match=r"assert_same_across_workers\('x'\): no worker results"):
        assert_same_across_workers([], "x")
    foreign = RayCluster("10.0.0.1:6379", started=False, timeout=1)
    with pytest.raises(ClusterError, match=r"add_node: the cluster at 10.0.0.1:6379 was not started by pytest-miles"):
        foreign.add_node()
