"""Engines as Ray actors, the deterministic env arriving through runtime_env.

`RayEngine` is an Engine whose real engine (embedded, or an SGLang server the actor starts on its
node, on the GPU Ray gave it) lives in an actor; `ray_start(cluster)` is the placement the engine
factory receives.
"""

from __future__ import annotations

from typing import Any

from pytest_miles.engines.base import EngineError, Output, SamplingParams
from pytest_miles.facts.environment import deterministic_env_vars
from pytest_miles.placement.ray_cluster import ClusterError, RayCluster

# ---- engines -------------------------------------------------------------------------------


class EngineHost:
    """The actor's body: builds the engine on its node and answers for it."""

    def __init__(self, spec) -> None:
        from pytest_miles.engines.launch import make_engine

        self.engine = make_engine(spec)

    def identity(self) -> dict[str, Any]:
        from pytest_miles.placement.probes import identity

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


def ray_start(cluster):
    """A placement for `EngineFactory(start=...)`: each engine in its own actor on `cluster()`."""
    return lambda spec: RayEngine(cluster(), spec)
