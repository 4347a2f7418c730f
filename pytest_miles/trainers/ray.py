"""Trainer ranks as Ray actors: `RayRankLauncher` starts each Megatron rank from its own actor
(one per rank), MASTER_ADDR being rank 0's node. The rank processes die with their actor
(PR_SET_PDEATHSIG), and teardown stops them before killing the actors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from pytest_miles.facts.environment import deterministic_env_vars
from pytest_miles.placement.processes import die_with_parent
from pytest_miles.placement.ray_cluster import RayCluster


class RankHost:
    """The actor's body for one trainer rank: runs the rank process on its node."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        from pytest_miles.placement.processes import free_port

        return free_port("0.0.0.0")

    def identity(self) -> dict[str, Any]:
        from pytest_miles.placement.probes import identity

        return identity()

    def start(self, argv: list[str], rank_env: dict[str, str], log: str) -> int:
        env = {**os.environ, **rank_env}  # os.environ holds the runtime_env's env_vars
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, preexec_fn=die_with_parent)
        return self.proc.pid

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        from pytest_miles.placement.processes import kill_tree

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

        from pytest_miles.placement.processes import tail
        from pytest_miles.trainers.megatron import wait_for_ranks

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
