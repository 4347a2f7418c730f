"""The same computation on every Ray worker, and what to conclude when they disagree.

`run_on_every_worker` pins one task per node (or per GPU); `assert_same_across_workers` names the
workers that disagree and diffs their fingerprints; `assert_env_propagated` checks the Miles
reproducibility guide's "hashes diverge across nodes -> NCCL_ALGO not propagated". See docs/cluster.md."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pytest_miles.placement.ray_cluster import ClusterError, NodeInfo, RayCluster
from pytest_miles.recording import recorded

RuntimeEnv = Mapping[str, Any] | Callable[[NodeInfo], Mapping[str, Any] | None] | None


@dataclass
class WorkerResult:
    node: NodeInfo
    slot: str  # "cpu" or "gpu 0", "gpu 1": which placement on the node
    value: Any = None
    error: str | None = None
    identity: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        pid = f", pid {self.identity['pid']}" if self.identity.get("pid") else ""
        gpus = self.identity.get("gpu_ids")
        slot = f"GPU {','.join(gpus)}" if gpus else self.slot
        return f"{self.node.label} {slot}{pid}"

    @property
    def ok(self) -> bool:
        return self.error is None


def _runtime_env(runtime_env: RuntimeEnv, node: NodeInfo) -> dict[str, Any] | None:
    """The runtime_env for `node` (a copy: the caller's dict is never changed), checked the way
    Ray would reject it late and vaguely: env_vars must map names to strings."""
    env = runtime_env(node) if callable(runtime_env) else runtime_env
    if not env:
        return None
    if not isinstance(env, Mapping):
        raise ClusterError(f"runtime_env for {node.label}: expected a dict, got {type(env).__name__}")
    env_vars = env.get("env_vars", {})
    if not isinstance(env_vars, Mapping):
        raise ClusterError(f"runtime_env['env_vars'] for {node.label}: expected a dict, got {type(env_vars).__name__}")
    for key, value in env_vars.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ClusterError(f"runtime_env['env_vars'][{key!r}] for {node.label}: {value!r} is not a string "
                               "(Ray passes env vars as strings)")
    return {**env, "env_vars": dict(env_vars)} if "env_vars" in env else dict(env)


def ship_by_value(fn: Callable) -> None:
    """Functions from test files are not importable on Ray workers: pickle their module by value
    (cloudpickle's register_pickle_by_value), as Ray users do for local modules."""
    import sys
    import sysconfig

    from ray import cloudpickle

    name = getattr(fn, "__module__", None)
    module = sys.modules.get(name or "")
    if module is None or name == "__main__" or name.split(".")[0] in ("pytest_miles", "ray", "torch"):
        return
    path = getattr(module, "__file__", None) or ""
    installed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")}
    if path and not any(path.startswith(p) for p in installed):
        try:
            cloudpickle.register_pickle_by_value(module)
        except ValueError:  # a namespace package or a module cloudpickle cannot ship
            pass


def run_on_every_worker(cluster: RayCluster, fn: Callable, *args: Any, per_gpu: bool = False,
                        runtime_env: RuntimeEnv = None, timeout: float | None = None,
                        with_fingerprint: bool = True, **kwargs: Any) -> list[WorkerResult]:
    """`fn(*args, **kwargs)` once per node (or once per GPU with `per_gpu`); never raises for a
    worker's failure: a task that raised, a worker that died, or no answer within `timeout` is a
    WorkerResult with `error` set, named by node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pytest_miles.placement import probes

    timeout = cluster.timeout if timeout is None else timeout
    nodes = cluster.nodes()
    if not nodes:
        raise ClusterError(f"the Ray cluster at {cluster.address} has no alive node")
    if per_gpu and not any(n.gpus for n in nodes):
        raise ClusterError(f"per_gpu=True, but no node of the Ray cluster at {cluster.address} has a GPU")
    ship_by_value(fn)
    remote = ray.remote(probes.call)
    pending: list[tuple[Any, WorkerResult]] = []
    for node in nodes:
        slots = [(f"gpu {i}", 1) for i in range(node.gpus)] if per_gpu else [("cpu", 0)]
        for slot, gpus in slots:
            opts: dict[str, Any] = {"num_cpus": 0, "num_gpus": gpus, "max_retries": 0,
                                    "scheduling_strategy": NodeAffinitySchedulingStrategy(node.node_id, soft=False)}
            env = _runtime_env(runtime_env, node)
            if env:
                opts["runtime_env"] = env
            ref = remote.options(**opts).remote(fn, args, kwargs, with_fingerprint)
            pending.append((ref, WorkerResult(node, slot)))
    refs = [r for r, _ in pending]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    ready_set = set(ready)
    out = []
    for ref, res in pending:
        if ref not in ready_set:
            res.error = (f"no answer within {timeout:g} s (task cancelled; a worker that dies as it starts looks "
                         f"like this: see the raylet and worker logs of that node)")
            ray.cancel(ref, force=True)
        else:
            try:
                got = ray.get(ref, timeout=timeout)
            except ray.exceptions.RayTaskError as exc:
                res.error = f"raised {type(exc.cause).__name__ if exc.cause else 'an error'}: {exc.cause or exc}"
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.ActorDiedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.RayError) as exc:
                res.error = f"worker died: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            else:
                res.value, res.identity = got["value"], got["identity"]
                res.fingerprint = got.get("fingerprint", {})
        out.append(res)
    return out


def _digest(value: Any) -> str:
    from pytest_miles.snapshots.store import canonical, digest_of

    return digest_of(canonical(value)[1])


def disagreement_report(results: list[WorkerResult], what: str = "the computation") -> str | None:
    """None when every worker answered with the same digest; else who differs, where, and why."""
    from pytest_miles.snapshots.store import canonical, configuration, diagnose, first_difference

    failed = [r for r in results if not r.ok]
    good = [r for r in results if r.ok]
    groups: dict[str, list[WorkerResult]] = {}
    for r in good:
        groups.setdefault(_digest(r.value), []).append(r)
    if not failed and len(groups) <= 1:
        return None
    lines = []
    if groups:
        majority_digest, majority = max(groups.items(), key=lambda kv: (len(kv[1]), -results.index(kv[1][0])))
        ref = majority[0]
        tie = sum(len(m) == len(majority) for m in groups.values()) > 1
        name = "no majority; compared with the first worker's group" if tie else "majority"
        lines.append(f"{len(results)} workers ran {what}; {name}: {len(majority)} of {len(results)} with digest "
                     f"{majority_digest[:16]} (e.g. {ref.label})")
        ref_conf = configuration(ref.fingerprint, {}) if ref.fingerprint else None
        for digest, members in groups.items():
            if digest == majority_digest:
                continue
            for r in members:
                where = first_difference(canonical(ref.value)[1], canonical(r.value)[1])
                lines.append(f"  DIFFERS: {r.label}: digest {digest[:16]}"
                             + (f"; first difference at {where}" if where else ""))
                if ref_conf is not None and r.fingerprint:
                    causes = diagnose(ref_conf, configuration(r.fingerprint, {}))
                    lines.extend(f"      fingerprint: {c}" for c in causes) if causes else lines.append(
                        "      fingerprint: identical to the majority's "
                        "(same stack: look at the data or the code path)")
    else:
        lines.append(f"{len(results)} workers ran {what}; none answered")
    lines.extend(f"  FAILED: {r.label}: {r.error}" for r in failed)
    return "\n".join(lines)


@recorded("same across workers")
def assert_same_across_workers(results: list[WorkerResult], what: str = "the computation") -> None:
    """Every worker answered, with bitwise the same value (digest of the canonical form)."""
    __tracebackhide__ = True
    if not results:
        raise ValueError(f"assert_same_across_workers({what!r}): no worker results to compare "
                         "(pass what run_on_every_worker returned)")
    report = disagreement_report(results, what)
    if report is not None:
        raise AssertionError(report)


@recorded("env propagated", kind="setup")
def assert_env_propagated(cluster: RayCluster, env: Mapping[str, str] | None = None, *,
                          runtime_env: RuntimeEnv = "default", per_gpu: bool | None = None,
                          timeout: float | None = None) -> list[WorkerResult]:
    """Every worker (every node, and every GPU where there are GPUs) sees `env` (default: the
    deterministic env vars). `runtime_env` is what the user's jobs pass to Ray (default: `env` as
    `env_vars`, as Miles does); a callable gives each node its own. Returns the probes."""
    __tracebackhide__ = True
    from pytest_miles.facts.environment import deterministic_env_vars
    from pytest_miles.placement import probes

    env = dict(deterministic_env_vars() if env is None else env)
    bad = [k for k, v in env.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"assert_env_propagated: env[{bad[0]!r}] = {env[bad[0]]!r} is not a string")
    if runtime_env == "default":
        runtime_env = {"env_vars": env}
    if per_gpu is None:
        per_gpu = cluster.gpus() > 0
    t0 = time.monotonic()
    results = run_on_every_worker(cluster, probes.env_values, sorted(env), per_gpu=per_gpu,
                                  runtime_env=runtime_env, timeout=timeout, with_fingerprint=False)
    bad = []
    for r in results:
        if not r.ok:
            bad.append(f"  {r.label}: {r.error}")
            continue
        wrong = {k: r.value.get(k) for k, v in env.items() if r.value.get(k) != v}
        if wrong:
            seen = ", ".join(f"{k}={v!r} (expected {env[k]!r})" if v is not None else f"{k} unset (expected {env[k]!r})"
                             for k, v in wrong.items())
            bad.append(f"  {r.label}: {seen}")
    if bad:
        raise AssertionError(f"the deterministic environment did not reach {len(bad)} of {len(results)} Ray workers "
                             f"(cluster {cluster.address}, probed in {time.monotonic() - t0:.1f} s); "
                             "the Miles reproducibility guide's "
                             f"'hashes diverge across nodes' failure:\n" + "\n".join(bad))
    return results
