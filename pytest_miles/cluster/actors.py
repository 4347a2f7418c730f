"""Engines and trainer ranks as Ray actors, the deterministic env arriving through runtime_env.

`RayEngine` is an Engine whose real engine (embedded, or an SGLang server the actor starts on
its node, on the GPU Ray gave it) lives in an actor. `RayRankLauncher` starts each Megatron rank
from its own actor (one per rank), MASTER_ADDR being rank 0's node. The rank processes die with
their actor (PR_SET_PDEATHSIG), and teardown stops them before killing the actors.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from ..engines.base import EngineError, Output, SamplingParams
from ..environment import deterministic_env_vars
from .ray_cluster import ClusterError, RayCluster


def _die_with_parent() -> None:  # pragma: no cover  (runs in the child, before exec)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# ---- engines -------------------------------------------------------------------------------


class EngineHost:
    """The actor's body: builds the engine on its node and answers for it."""

    def __init__(self, spec) -> None:
        from ..engines.factory import make_engine

        self.engine = make_engine(spec)

    def identity(self) -> dict[str, Any]:
        from .probes import identity

        return {**identity(), "engine": getattr(self.engine, "name", "?"),
                "startup_seconds": getattr(self.engine, "startup_seconds", None)}

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Output]:
        return self.engine.generate(prompts, params)

    def score(self, prompt: list[int], continuation: list[int]) -> list[float]:
        return self.engine.score(prompt, continuation)

    def flush_cache(self) -> None:
        self.engine.flush_cache()

    def alive(self) -> bool:
        return bool(getattr(self.engine, "alive", True))

    def close(self) -> None:
        self.engine.close()


class RayEngine:
    """Engine protocol over an EngineHost actor; `where` says which node/GPU it runs on."""

    def __init__(self, cluster: RayCluster, spec, *, runtime_env: dict[str, Any] | None = None) -> None:
        import ray

        self.spec, self.cluster = spec, cluster
        self.name = f"{spec.kind}@ray"
        self.has_prefix_cache = spec.kind.startswith("sglang")
        if spec.gpus and cluster.gpus() < spec.gpus:
            raise ClusterError(f"engine {spec.kind!r} needs {spec.gpus} GPU(s); the Ray cluster at {cluster.address} "
                               f"has {cluster.gpus()}")
        env = runtime_env or {"env_vars": deterministic_env_vars()}
        self._actor = ray.remote(EngineHost).options(num_cpus=0, num_gpus=spec.gpus, max_restarts=0,
                                                      runtime_env=env).remote(spec)
        self._closed = False
        try:
            self.where = self._call("identity", timeout=spec.startup_timeout + 30)
        except BaseException:
            self.close()
            raise
        self.startup_seconds = self.where.get("startup_seconds")

    def _call(self, method: str, *args: Any, timeout: float | None = None):
        import ray

        try:
            return ray.get(getattr(self._actor, method).remote(*args), timeout=timeout or self.spec.startup_timeout)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, EngineError):
                raise EngineError(f"{self.name} on {self._where()}: {cause}") from None
            raise EngineError(f"{self.name} on {self._where()}: {type(cause).__name__}: {cause}") from None
        except ray.exceptions.GetTimeoutError:
            raise EngineError(f"{self.name} on {self._where()}: no answer to {method} within "
                              f"{timeout or self.spec.startup_timeout:g} s") from None
        except ray.exceptions.RayActorError as exc:
            raise EngineError(f"{self.name}: its actor on {self._where()} died ({str(exc).splitlines()[0]})") from None

    def _where(self) -> str:
        w = getattr(self, "where", None)
        if not w:
            return "the Ray cluster"
        gpu = f" GPU {','.join(w['gpu_ids'])}" if w.get("gpu_ids") else ""
        return f"node {w['node_id'][:8]} ({w['ip']}){gpu}"

    @property
    def alive(self) -> bool:
        if self._closed:
            return False
        try:
            return bool(self._call("alive", timeout=30))
        except EngineError:
            return False

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[Output]:
        return self._call("generate", prompts, params or SamplingParams())

    def score(self, prompt: list[int], continuation: list[int]) -> list[float]:
        return self._call("score", prompt, continuation)

    def flush_cache(self) -> None:
        self._call("flush_cache")

    def close(self) -> None:
        import ray

        if self._closed:
            return
        self._closed = True
        try:
            ray.get(self._actor.close.remote(), timeout=60)
        except Exception:  # noqa: BLE001  (a dead actor has nothing left to close)
            pass
        ray.kill(self._actor)

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- trainer ranks -------------------------------------------------------------------------


class RankHost:
    """The actor's body for one trainer rank: runs the rank process on its node."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        from ..processes import free_port

        return free_port("0.0.0.0")

    def identity(self) -> dict[str, Any]:
        from .probes import identity

        return identity()

    def start(self, argv: list[str], rank_env: dict[str, str], log: str) -> int:
        env = {**os.environ, **rank_env}  # os.environ holds the runtime_env's env_vars
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent)
        return self.proc.pid

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        from ..processes import kill_tree

        if self.proc is not None and self.proc.poll() is None:
            kill_tree(self.proc.pid, timeout=5)


class RayRankLauncher:
    """`MegatronTrainer(launcher=RayRankLauncher(cluster))`: one actor per rank on the cluster."""

    def __init__(self, cluster: RayCluster, *, runtime_env: dict[str, Any] | None = None) -> None:
        self.cluster, self.runtime_env = cluster, runtime_env
        self.placements: list[dict[str, Any]] = []  # where each rank ran, from the last launch

    def launch(self, *, world: int, gpus_per_rank: int, argv: list[str], extra_env: dict[str, str],
               run_dir, timeout: float, error) -> None:
        import ray

        from ..processes import tail
        from ..trainers.megatron import wait_for_ranks

        if gpus_per_rank and self.cluster.gpus() < world * gpus_per_rank:
            raise error(f"{world} rank(s) need {world * gpus_per_rank} GPU(s); the Ray cluster at "
                        f"{self.cluster.address} has {self.cluster.gpus()}")
        env = self.runtime_env or {"env_vars": deterministic_env_vars()}
        actors = [ray.remote(RankHost).options(num_cpus=0, num_gpus=gpus_per_rank, max_restarts=0,
                                               runtime_env=env).remote() for _ in range(world)]
        try:
            try:
                self.placements = ray.get([a.identity.remote() for a in actors], timeout=self.cluster.timeout)
            except ray.exceptions.GetTimeoutError:
                raise error(f"{world} rank actor(s) could not be placed on the Ray cluster at {self.cluster.address} "
                            f"within {self.cluster.timeout:g} s (nodes: "
                            f"{', '.join(n.label for n in self.cluster.nodes())})") from None
            master = ray.get(actors[0].node_ip.remote(), timeout=self.cluster.timeout)
            port = ray.get(actors[0].free_port.remote(), timeout=self.cluster.timeout)
            logs = [run_dir / f"rank{r}.log" for r in range(world)]
            for r, a in enumerate(actors):
                rank_env = {"MASTER_ADDR": master, "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                            "RANK": str(r), "LOCAL_RANK": "0" if gpus_per_rank else str(r), "PYTHONUNBUFFERED": "1",
                            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **extra_env}
                ray.get(a.start.remote(argv, rank_env, str(logs[r])), timeout=self.cluster.timeout)

            def poll():
                try:
                    return ray.get([a.poll.remote() for a in actors], timeout=60)
                except ray.exceptions.RayActorError as exc:
                    raise error(f"a rank's actor died ({str(exc).splitlines()[0]}); rank 0 log tail:\n"
                                f"{tail(logs[0])}") from None

            wait_for_ranks(poll, logs, timeout, error,
                           where=lambda r: f" (Ray actor on node {self.placements[r]['node_id'][:8]})")
        finally:
            try:
                ray.get([a.stop.remote() for a in actors], timeout=30)
            except Exception:  # noqa: BLE001
                pass
            for a in actors:
                ray.kill(a)
