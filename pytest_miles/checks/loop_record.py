"""What one loop iteration leaves behind: every bit a second run must reproduce."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LoopRecord:
    iteration: int  # 1-based, as Miles counts
    prompts: list[list[int]]
    sampling_seeds: list[list[int]]  # [prompt][sample]
    tokens: list[list[list[int]]]  # rollout token ids [prompt][sample][token]
    logprob_bits: list[list[list[str]]]  # rollout logprobs as float.hex()
    rewards: list[list[float]]
    advantages: list[list[float]]
    train_logprob_bits: list[list[list[str]]]  # trainer's logprobs of the same tokens, before the step
    train_rollout_logprob_abs_diff: float  # Miles' figure: mean |logp_train - logp_rollout|
    loss_bits: str
    grad_norm_bits: str
    checkpoint: str
    checkpoint_manifest: dict[str, str]  # tensor/object name -> sha256 (pytest_miles.checks manifest)
    weights: str  # the HF checkpoint pushed to the engine
    weights_manifest: dict[str, str]
    seconds: dict[str, float] = field(default_factory=dict)
    sync: dict[str, Any] = field(default_factory=dict)  # checks.weight_sync's verdict on this iteration's sync

    @property
    def loss(self) -> float:
        return float.fromhex(self.loss_bits)

    @property
    def grad_norm(self) -> float:
        return float.fromhex(self.grad_norm_bits)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoopRun:
    """A whole loop: its records (one per iteration) and where its artefacts are."""

    name: str
    records: list[LoopRecord]
    engine: str
    work_dir: str
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "engine": self.engine, "work_dir": self.work_dir, "notes": self.notes,
                "records": [r.to_json() for r in self.records]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoopRun:
        return cls(data["name"], [LoopRecord(**r) for r in data["records"]], data["engine"], data["work_dir"],
                   list(data.get("notes", [])))

    def stage_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.records:
            for k, v in r.seconds.items():
                out[k] = out.get(k, 0.0) + v
        return out
