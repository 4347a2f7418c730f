"""A Miles-style CI test: a plain `python3 test_determinism_ci.py` script, no pytest.

Miles runs its end-to-end GPU tests this way (each file registered for CI by a literal
`register_cuda_ci(...)` call, run as a script, exit code = result). pytest-miles' helpers work
the same outside pytest: they raise AssertionError with the full explanation and record nothing.

    python3 examples/miles_style/test_determinism_ci.py              # CPU: the embedded tiny model
    python3 examples/miles_style/test_determinism_ci.py --engine sglang   # a GPU host with SGLang

Exit 0 when every check passes, 1 when one fails (its explanation printed), 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from pytest_miles import (
    assert_batch_invariant,
    assert_checkpoints_equal,
    deterministic_env_vars,
    discover,
    run_doctor,
)
from pytest_miles.facts.doctor_env import check_run_env


def check(name: str, fn) -> bool:
    t0 = time.perf_counter()
    try:
        fn()
    except AssertionError as exc:
        print(f"FAIL {name} ({time.perf_counter() - t0:.1f} s)\n{exc}")
        return False
    print(f"PASS {name} ({time.perf_counter() - t0:.1f} s)")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("reference", "sglang"), default="reference")
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()

    # 1. The environment Miles would hand its workers (its --train-env-vars / Ray runtime_env).
    train_env = deterministic_env_vars()
    os.environ.update(train_env)  # as Miles' launcher does for the processes it starts
    findings = check_run_env(train_env, "train env") + run_doctor(gpu=bool(discover().nvidia), process_checks=False)
    bad = [f.line() for f in findings if f.status == "fail"]
    ok = check("deterministic train env", lambda: _no_failures(bad))

    with tempfile.TemporaryDirectory() as tmp:
        from pytest_miles.models.embedded import write_hf_checkpoint

        model = write_hf_checkpoint(Path(tmp) / "model")
        # 2. Rollout batch invariance: every item's ids and logprobs, bitwise, at every batch size.
        if args.engine == "sglang":
            from pytest_miles.engines.server import SGLangEngine
            engine = SGLangEngine(model, deterministic=True)  # real `python -m sglang.launch_server`
        else:
            from pytest_miles.engines.reference import ReferenceEngine
            engine = ReferenceEngine(model, deterministic=True)
        with engine:
            ok &= check(f"batch invariance [single] on {engine.name}",
                        lambda: assert_batch_invariant(engine, mode="single", trials=args.trials, prompt_len=16))
        # 3. Two saves of the same weights are equal bit for bit (Miles: --ci-save-model-hash).
        again = write_hf_checkpoint(Path(tmp) / "model-again")
        ok &= check("checkpoints equal", lambda: assert_checkpoints_equal(model, again))
    assert "pytest" not in sys.modules or os.environ.get("PYTEST_CURRENT_TEST"), "the helpers imported pytest"
    return 0 if ok else 1


def _no_failures(lines: list[str]) -> None:
    if lines:
        raise AssertionError("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
