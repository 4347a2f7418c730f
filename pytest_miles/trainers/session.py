"""`MegatronSession`: megatron-core ranks that stay up across RL iterations and take commands.

Miles' trainer actors live for the whole run, and relaunching every iteration would pay
megatron's start-up each time. How commands travel and how ranks end: docs/trainers.md.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pytest_miles.errors import InputError, TrainerError
from pytest_miles.placement.ownership import disown, spawn
from pytest_miles.placement.processes import PORT_RACE_TRIES, exited, kill_tree, port_race_lost, tail


def send_to_ranks(procs: list[subprocess.Popen], logs: list[Path], line: bytes, who: str, when: str = "") -> None:
    """One command line to every rank's stdin; TrainerError naming a rank that is gone (`who` names
    the ranks, `when` what they were about to do) with its log tail."""
    for r, p in enumerate(procs):
        try:
            p.stdin.write(line)
            p.stdin.flush()
        except (BrokenPipeError, OSError):
            raise TrainerError(f"{who} {r} is gone (exit code {p.poll()}){when}; log {logs[r]}:\n"
                               f"{tail(logs[r])}") from None


def wait_for_reply(reply: Path, procs: list[subprocess.Popen], logs: list[Path], deadline: float, who: str,
                   during: str, late: str, poll: float) -> None:
    """Wait until rank 0 writes `reply`, watching every rank: TrainerError naming a rank that exits
    (`during` what) or, past `deadline` (time.monotonic()), saying `late`; each with a log tail."""
    while not reply.exists():
        for r, p in enumerate(procs):
            if p.poll() is not None:
                raise TrainerError(f"{who} {r} {exited(p.returncode)} {during} (log {logs[r]}):\n"
                                   f"{tail(logs[r])}")
        if time.monotonic() > deadline:
            raise TrainerError(f"{late}; rank 0 log tail:\n{tail(logs[0])}")
        time.sleep(poll)


def close_ranks(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """Ranks that read commands from stdin: EOF to each (it leaves its command loop and exits),
    `grace` seconds for all of them, then the process tree of any still up is killed."""
    for p in procs:
        try:
            p.stdin.close()
        except OSError:
            pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        if p.poll() is None:
            kill_tree(p.pid)
            p.wait(timeout=10)
        disown(p.pid)


class MegatronSession:
    def __init__(self, trainer, *, init_hf: str | Path | None = None, load_dir: str | Path | None = None,
                 hf_config: dict | None = None, timeout: float | None = None) -> None:
        if trainer.launcher is not None:
            raise TrainerError("a trainer session runs local rank processes; --miles-placement=ray is not supported "
                               "for the RL loop's trainer yet")
        if load_dir is not None and not (Path(load_dir) / "latest_checkpointed_iteration.txt").exists():
            raise TrainerError(f"load_dir {load_dir}: no latest_checkpointed_iteration.txt, nothing to resume from")
        if init_hf is not None and not (Path(init_hf) / "config.json").exists():
            raise TrainerError(f"init_hf {init_hf}: no config.json (not an HF model directory)")
        self.trainer = trainer
        self.hf_config = hf_config
        self.timeout = timeout or trainer.timeout
        trainer.launches += 1
        trainer.log_dir.mkdir(parents=True, exist_ok=True)
        # its own directory: trainers often share a log_dir, and a stale reply file must never answer
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"session-{trainer.launches}-", dir=trainer.log_dir))
        spec = {**trainer.spec(), "init_hf": str(init_hf) if init_hf else None,
                "load_dir": str(load_dir) if load_dir else None, "hf_config": hf_config, "run_dir": str(self.run_dir)}
        (self.run_dir / "spec.json").write_text(json.dumps(spec))
        self.procs: list[subprocess.Popen] = []
        self.logs = [self.run_dir / f"rank{r}.log" for r in range(trainer.world)]
        self.lease = None
        self.commands = 0
        self.seconds: dict[str, float] = {}
        self._start()

    def _start(self, tries: int = PORT_RACE_TRIES) -> None:
        t = self.trainer
        lease_env: dict[str, str] = {}
        if t.device == "cuda" and t.gpu_lease is not None:
            self.lease = t.gpu_lease(t.world, f"megatron session ({t.world} rank(s))")
            lease_env = self.lease.env
        base = t.rank_env(lease_env)
        spare = t.pool.take_session(t, base) if t.pool is not None else None
        if spare is not None and self._from_spare(spare):
            return
        try:
            for rank in range(t.world):
                env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                with open(self.logs[rank], "wb") as f:
                    self.procs.append(spawn(  # dies with pytest, however it dies (ownership.py)
                        [t.python, "-m", "pytest_miles.trainers.megatron_session", str(self.run_dir / "spec.json")],
                        stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.PIPE, env=env))
            self.call("ready")
        except TrainerError:
            self.close()
            if tries > 1 and port_race_lost(self.logs):  # a race for the free port: a new one
                return self._start(tries - 1)
            raise
        except BaseException:
            self.close()
            raise

    def _from_spare(self, spare) -> bool:
        """The session on a spare's ranks (trainers/pool.py: started in the background, imports done,
        process group joined); False, the spare closed, where it lost the race for its port (a fresh
        start follows)."""
        try:
            self.procs, self.logs = spare.hand_over(self.run_dir / "spec.json", self.timeout)
            self.call("ready")
            return True
        except BaseException as exc:
            spare.close()  # its ranks, where the hand-over did not happen
            self.close()  # the session's, where it did
            if not (isinstance(exc, TrainerError) and port_race_lost(spare.logs)):
                raise
            self.logs = [self.run_dir / f"rank{r}.log" for r in range(self.trainer.world)]
            return False

    def call(self, op: str, **args: Any) -> dict:
        """Send one command to every rank; rank 0's answer (TrainerError if a rank fails)."""
        if not self.procs:
            raise TrainerError("the trainer session is closed")
        self.commands += 1
        reply = self.run_dir / f"reply-{self.commands}.json"
        line = (json.dumps({"id": self.commands, "op": op, "reply": str(reply), **args}) + "\n").encode()
        t0 = time.monotonic()
        send_to_ranks(self.procs, self.logs, line, "megatron rank", f" before {op!r}")
        wait_for_reply(reply, self.procs, self.logs, t0 + self.timeout, "megatron rank", f"during {op!r}",
                       f"megatron session: {op!r} did not finish within {self.timeout:g} s", poll=0.02)
        out = json.loads(reply.read_text())
        self.seconds[op] = self.seconds.get(op, 0.0) + time.monotonic() - t0
        if "error" in out:
            raise TrainerError(f"megatron session: {op!r} failed on rank 0:\n{out['error']}")
        return out

    # -- the loop's commands ---------------------------------------------------------------

    def logprobs(self, samples: list[dict]) -> list[list[float]]:
        """Per sample ({"tokens", "prompt_len"}), the logprobs of its response tokens."""
        return [[float.fromhex(x) for x in row] for row in self.call("logprobs", samples=samples)["logprobs"]]

    def score(self, samples: list[dict], replay: list | None = None) -> dict:
        """Per sample ({"tokens", "prompt_len"}): "logprobs" of its response tokens, the "targets"
        (token ids) they were taken for and the input "positions" that scored them. `replay`: one
        RoutingRecord per sample (the rollout's routing), forced in every MoE layer of the forward
        (rollout routing replay, Miles' --use-rollout-routing-replay)."""
        out = self.call("score", samples=samples, **self._replay(samples, replay))
        return {**out, "logprobs": [[float.fromhex(x) for x in row] for row in out["logprobs"]]}

    def train_step(self, samples: list[dict], *, eps_clip: float = 0.2, eps_clip_high: float = 0.28,
                   trace: str | Path | None = None) -> dict:
        """One GRPO step: samples carry tokens, prompt_len, advantage, old_logprobs (rollout's).
        `trace`: a safetensors path for this step's forward outputs and backward gradients per
        layer point (the divergence locator's records); the answer's "trace" names it."""
        extra = {"trace": str(trace)} if trace is not None else {}
        return self.call("train", samples=samples, eps_clip=eps_clip, eps_clip_high=eps_clip_high, **extra)

    def reset(self, init_hf: str | Path) -> None:
        """Load the HF weights at `init_hf` again and start a fresh optimizer (the state a session
        opened on them starts in): a second run in the same ranks, without paying the start-up."""
        self.call("reset", init_hf=str(init_hf))

    def hidden_states(self, tokens: list[int], path: str | Path) -> dict:
        """Per layer point the [tokens, hidden] output of one forward of `tokens` (forward hooks),
        in the locator's names; written to `path` (safetensors) on the way."""
        from safetensors.torch import load_file

        return load_file(self.call("trace", tokens=list(tokens), path=str(path))["path"])

    def routing(self, samples: list[dict], replay: list | None = None) -> list:
        """The experts each sample's tokens go to in each MoE layer, from one forward (no step):
        one RoutingRecord per sample (its "tokens"); with `replay` (as in score), the experts the
        forward was made to use."""
        from pytest_miles.models.routing import RoutingRecord

        out = self.call("routing", samples=samples, **self._replay(samples, replay))
        return [RoutingRecord.from_json(x) for x in out["records"]]

    def _replay(self, samples: list[dict], replay: list | None) -> dict:
        from pytest_miles.models.routing import replay_experts

        if replay is None:
            return {}
        m = self.trainer.model
        if not m.num_moe_experts:
            raise InputError("routing replay: the trainer's model is dense (no router); a mixture-of-experts "
                             "shape (tiny-moe, qwen3-30b-a3b-2l) is accepted")
        if getattr(self.trainer, "tp", 1) != 1:
            raise InputError(f"routing replay: tensor parallel size {self.trainer.tp}; size 1 is accepted (the "
                             "host router replays whole [sequence, batch] token rows)")
        return {"replay": replay_experts(replay, samples, m.num_layers, m.num_moe_experts, m.moe_router_topk)}

    def save(self, save_dir: str | Path, iteration: int) -> Path:
        return Path(self.call("save", save_dir=str(save_dir), iteration=iteration)["checkpoint"])

    def export_hf(self, path: str | Path, dtype: str = "float32") -> Path:
        """The weights as an HF checkpoint (through pytest_miles.models.convert), for the engine."""
        return Path(self.call("export", path=str(path), dtype=dtype)["path"])

    def export_state(self, path: str | Path) -> Path:
        """The model's megatron-core state dict as one safetensors file (what the trainer holds,
        unconverted): compare it with the served weights through
        `assert_served_weights_equal(engine, state, config=...)`."""
        return Path(self.call("state", path=str(path))["path"])

    def live_hf(self, path: str | Path) -> dict:
        """The model's live parameters (its own state dict, not what `export_hf` sends), converted
        to HF names: what the served weights must equal after a sync."""
        from safetensors.torch import load_file

        from pytest_miles.models.convert import megatron_to_hf
        from pytest_miles.models.embedded import TinyConfig

        if not self.hf_config:
            raise TrainerError("live_hf: this session has no hf_config (the HF model's shapes)")
        spec = "te" if self.trainer.transformer_impl == "transformer_engine" else "local"
        return megatron_to_hf(load_file(str(self.export_state(path))), TinyConfig(**self.hf_config), spec=spec)

    def close(self) -> None:
        procs, self.procs = self.procs, []
        close_ranks(procs)
        if self.lease is not None:
            lease, self.lease = self.lease, None
            lease.release()

    def __enter__(self) -> MegatronSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a session dropped without close() must not leave ranks behind
        try:
            self.close()
        except Exception:
            pass
