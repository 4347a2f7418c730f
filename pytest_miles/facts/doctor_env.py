"""The doctor for a run's environment before the run: a Ray `runtime_env` JSON file or Miles'
`--train-env-vars` JSON, checked against the deterministic env-var set, plus the one conflict
the two stacks have with each other:

- SGLang, with `--enable-deterministic-inference` and `--tp-size > 1`, sets
  `NCCL_ALGO=allreduce:tree` in its own server process (python/sglang/srt/server_args.py,
  `_handle_deterministic_inference`, sgl-project/sglang#10930).
- Megatron's deterministic-mode validator (megatron/training/arguments.py `validate_args`; the
  same list in Megatron-Bridge's ConfigContainer) accepts NCCL_ALGO only as one of
  Tree, Ring, CollnetDirect, CollnetChain, ^NVLS, compared as whole strings.

So `allreduce:tree` in the TRAINING env (copied from SGLang's setting into a shared runtime_env)
fails Megatron's check ("NCCL_ALGO must be one of ..."). The fix: NCCL_ALGO=Ring for training;
SGLang sets its own value itself, nothing to pass for the rollout side.
"""

from __future__ import annotations

from typing import Any

from pytest_miles.errors import EnvInputError  # noqa: F401  (importable here too)
from pytest_miles.facts.doctor import FAIL, OK, SKIP, Finding, check_env_var
from pytest_miles.facts.environment import DETERMINISTIC_ENV

MEGATRON_NCCL_ALGOS = ("Tree", "Ring", "CollnetDirect", "CollnetChain", "^NVLS")
MEGATRON_VALIDATOR = "megatron/training/arguments.py validate_args (deterministic mode)"
SGLANG_SETTING = "python/sglang/srt/server_args.py _handle_deterministic_inference (TP > 1)"


def _env_vars(data: Any, source: str, where: str) -> dict[str, str]:
    if not isinstance(data, dict):
        raise EnvInputError(f"{source}: {where} must be a JSON object of NAME: value, got {type(data).__name__}")
    bad = [k for k, v in data.items() if not isinstance(v, (str, int, float)) or isinstance(v, bool)]
    if bad:
        raise EnvInputError(f"{source}: {where}: values must be strings (or numbers); not: {', '.join(bad)}")
    return {str(k): str(v) for k, v in data.items()}


def load_runtime_env(path: str) -> dict[str, str]:
    """env_vars of a Ray runtime_env JSON file (`{"env_vars": {...}, ...}`)."""
    from pytest_miles._files import load_json

    data = load_json(path, "--runtime-env (a Ray runtime_env JSON file)", error=EnvInputError)
    if not isinstance(data, dict):
        raise EnvInputError(f"--runtime-env {path}: a Ray runtime_env is a JSON object with an \"env_vars\" key")
    return _env_vars(data.get("env_vars", {}), f"--runtime-env {path}", "env_vars")


def parse_train_env_vars(text: str) -> dict[str, str]:
    """Miles' `--train-env-vars '{"NCCL_ALGO": "Ring", ...}'`."""
    from pytest_miles._files import parse_json

    data = parse_json(text, f"--train-env-vars {text[:80]!r} (a JSON object of NAME: value)", EnvInputError)
    return _env_vars(data, "--train-env-vars", "the value")


def check_nccl_conflict(env: dict[str, str], source: str, sglang_tp: int | None) -> Finding:
    """NCCL_ALGO against Megatron's validator, and what SGLang will set for itself."""
    name = f"NCCL_ALGO vs Megatron and SGLang ({source})"
    value = env.get("NCCL_ALGO")
    sglang = (f"SGLang sets NCCL_ALGO=allreduce:tree in its own server process with TP={sglang_tp} "
              f"({SGLANG_SETTING}); that needs nothing from you") if sglang_tp and sglang_tp > 1 else ""
    if value is None:
        return Finding(name, SKIP, "NCCL_ALGO not set here (the env-var check reports it)")
    if value not in MEGATRON_NCCL_ALGOS:
        return Finding(
            name, FAIL,
            f"{value!r} is rejected by Megatron's deterministic-mode validator ({MEGATRON_VALIDATOR} accepts only "
            f"{', '.join(MEGATRON_NCCL_ALGOS)} as whole values)"
            + (" -- it is SGLang's TP > 1 setting, which belongs to SGLang's own process" if "tree" in value.lower()
               and ":" in value else ""),
            "Megatron fails at start-up with 'NCCL_ALGO must be one of ...' (deterministic mode)",
            "set NCCL_ALGO=Ring in the training env (runtime_env env_vars / --train-env-vars); do not copy "
            "SGLang's allreduce:tree: SGLang sets it for itself when --tp-size > 1 with "
            "--enable-deterministic-inference")
    return Finding(name, OK, f"{value} passes Megatron's validator" + (f"; {sglang}" if sglang else ""))


def check_run_env(env: dict[str, str], source: str, sglang_tp: int | None = None) -> list[Finding]:
    """The deterministic env-var checks on a run's env (strict: the run is for GPUs), plus the
    Megatron/SGLang NCCL_ALGO conflict."""
    findings = []
    for var in DETERMINISTIC_ENV:
        f = check_env_var(var, env)
        findings.append(Finding(f"{f.check} ({source})", f.status, f.detail, f.symptom, f.fix))
    findings.append(check_nccl_conflict(env, source, sglang_tp))
    return findings


__all__ = ["EnvInputError", "check_run_env", "load_runtime_env", "parse_train_env_vars", "FAIL", "OK"]
