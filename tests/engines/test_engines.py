"""Engines and batch-invariance checks on CPU: real torch, real subprocesses and ports."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("torch")

from pytest_miles import assert_batch_invariant  # noqa: E402
from pytest_miles.checks.batch_invariance import MODES, check_batch_invariance, negative_control  # noqa: E402
from pytest_miles.engines.base import EngineError, SamplingParams  # noqa: E402
from pytest_miles.engines.reference import ReferenceEngine  # noqa: E402
from pytest_miles.engines.reference_server_engine import ReferenceServerEngine  # noqa: E402
from pytest_miles.engines.server import ServerEngine, sglang_passthrough  # noqa: E402
from pytest_miles.models.embedded import write_hf_checkpoint  # noqa: E402
from pytest_miles.placement.processes import free_port  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def invariant(model_dir):
    with ReferenceEngine(model_dir, deterministic=True) as e:
        yield e


@pytest.fixture(scope="module")
def batched(model_dir):
    with ReferenceEngine(model_dir) as e:
        yield e


def test_tiny_model_dir_is_an_hf_checkpoint(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert (model_dir / "model.safetensors").exists() and not (model_dir / "tokenizer.json").exists()


@pytest.mark.parametrize("mode", [m for m in MODES if m != "radix_cache"])
def test_batch_invariant_reference_passes_every_mode(invariant, mode):
    report = assert_batch_invariant(invariant, mode=mode, trials=4, max_batch=6, prompt_len=16)
    assert report.passed and report.samples >= 4
    assert all(n == 1 for n in report.unique.values()), report.unique


@pytest.mark.parametrize("mode", ["single", "needle"])
def test_batched_reference_fails_with_pinpointed_report(batched, mode):
    with pytest.raises(AssertionError) as exc:
        assert_batch_invariant(batched, mode=mode, trials=6, max_batch=8, prompt_len=16)
    text = str(exc.value)
    assert f"batch invariance [{mode}] on reference: FAIL" in text
    assert "first difference at token" in text and "logprob" in text and "unique samples per prompt" in text
    report = check_batch_invariance(batched, mode, trials=6, max_batch=8, prompt_len=16)
    m = report.mismatches[0]
    assert m.expected_id == m.got_id, "same tokens, different logprob bits: the CPU non-invariance"
    assert m.expected_logprob != m.got_logprob and m.batch_size > 1


def test_batched_reference_p_vs_d_fails_and_invariant_passes(batched, invariant):
    assert not check_batch_invariance(batched, "p_vs_d", trials=3, prompt_len=16).passed
    assert check_batch_invariance(invariant, "p_vs_d", trials=3, prompt_len=16).passed


def test_negative_control(batched, invariant):
    report = negative_control(batched, "single", trials=4, prompt_len=16)
    assert "the check can fail here" in report.render()
    with pytest.raises(AssertionError, match="an engine with its deterministic / batch-invariant mode ON"):
        negative_control(invariant, "single", trials=2, prompt_len=16)


def test_progress_is_reported(invariant):
    seen = []
    check_batch_invariance(invariant, "single", trials=3, prompt_len=8, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "chaos"}, "mode: 'chaos' is not one of single, prefix, prefix_long_anchor, radix_cache, p_vs_d, needle"),
    ({"trials": 0}, "trials: 0 is not accepted; expected an integer >= 1 and <= 1000000"),
    ({"trials": 2.5}, "trials: 2.5 is not accepted; expected an integer >= 1"),
    ({"trials": 2**70}, "trials: 1180591620717411303424 is not accepted; expected an integer >= 1 and <= 1000000"),
    ({"batch_sizes": 8}, "batch_sizes: 8 is not accepted; expected a non-empty list of batch sizes, e.g. [1, 2, 4, 8]"),
    ({"batch_sizes": [1, "2"]}, "batch_sizes[1]: '2' is not accepted; expected an integer >= 1"),
    ({"prompt": "hello"}, "prompt: 'hello' is not accepted; expected a non-empty list of token ids"),
    ({"prompt": [5, -1]}, "prompt: [5, -1] is not accepted; expected a non-empty list of token ids"),
    ({"progress": "bar"}, "progress: expected a callable(done, total) or None, got str"),
    ({"params": {"temperature": 0}}, "params: expected a SamplingParams, got dict"),
    ({"max_batch": 0}, "max_batch: 0 is not accepted; expected an integer >= 1"),
])
def test_bad_check_arguments(invariant, kwargs, message):
    with pytest.raises(ValueError) as exc:
        check_batch_invariance(invariant, **{"mode": "single", "trials": 2, **kwargs})
    assert str(exc.value).startswith(message), str(exc.value)


def test_bad_prompts_and_params(invariant):
    with pytest.raises(ValueError, match=r"prompts\[1\]: token id 99999 outside the vocabulary"):
        invariant.generate([[5, 6], [99999]], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ReferenceEngine("/nonexistent-model-dir")


def test_sglang_passthrough_follows_miles_convention():
    assert sglang_passthrough(["--sglang-mem-fraction-static", "0.5", "--sglang-log-level", "debug", "--x"]) == [
        "--mem-fraction-static", "0.5", "--log-level", "debug", "--x"]


def test_sglang_server_skips_deepgemm_precompile_unless_the_user_sets_it(model_dir, monkeypatch):
    """The SGLang server's environment (the process is not started): DeepGEMM's 10-20 min start-up
    precompile is off by default, a user's own SGLANG_JIT_DEEPGEMM_PRECOMPILE wins, and the
    deterministic variables are there either way."""
    from pytest_miles.engines.server import SGLangEngine

    monkeypatch.delenv("SGLANG_JIT_DEEPGEMM_PRECOMPILE", raising=False)
    env = SGLangEngine(model_dir).env
    assert env["SGLANG_JIT_DEEPGEMM_PRECOMPILE"] == "0" and env["NCCL_ALGO"] == "Ring"
    monkeypatch.setenv("SGLANG_JIT_DEEPGEMM_PRECOMPILE", "1")
    assert SGLangEngine(model_dir).env["SGLANG_JIT_DEEPGEMM_PRECOMPILE"] == "1"
    assert SGLangEngine(model_dir, env={"X_MILES": "y"}).env["X_MILES"] == "y"


# ---- the server engine: real subprocess, real port --------------------------------------------


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with ReferenceServerEngine(model_dir, deterministic=True, log_dir=tmp_path_factory.mktemp("logs")) as s:
        yield s


def test_server_engine_matches_in_process_engine(server, invariant):
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = SamplingParams(temperature=1.0, max_new_tokens=5)
    http = server.generate(prompts, params)
    local = invariant.generate(prompts, params)
    assert [o.output_ids for o in http] == [o.output_ids for o in local]
    assert [o.logprobs for o in http] == [o.logprobs for o in local]
    assert server.score([5, 6, 7, 8], http[0].output_ids) == http[0].logprobs
    assert server.startup_seconds is not None


@pytest.mark.parametrize("mode", ["single", "needle", "p_vs_d"])
def test_server_engine_passes_modes(server, mode):
    assert_batch_invariant(server, mode=mode, trials=3, max_batch=4, prompt_len=8)


def test_engine_dying_mid_check_is_a_clear_error(model_dir, tmp_path):
    import psutil

    eng = ReferenceServerEngine(model_dir, log_dir=tmp_path).start()
    try:
        calls = {"n": 0}
        real = eng.generate

        def generate_then_die(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                psutil.Process(eng.proc.pid).kill()
                eng.proc.wait(10)
            return real(*a, **k)

        eng.generate = generate_then_die
        with pytest.raises(EngineError,
                           match=r"reference-server is not running \(exit code -9\); log tail:\n.*reference server on"):
            check_batch_invariance(eng, "single", trials=3, prompt_len=8)
    finally:
        eng.close()


def test_server_that_never_becomes_healthy_times_out(tmp_path):
    port = free_port()
    eng = ServerEngine([sys.executable, "-c", "print('booting', flush=True); import time; time.sleep(600)"],
                       port=port, startup_timeout=3, log_dir=tmp_path)
    with pytest.raises(EngineError, match=r"did not become healthy within 3 s .*\n.*booting"):
        eng.start()
    assert eng.proc is None, "the process was killed"


def test_server_that_exits_at_start_carries_its_log(tmp_path):
    eng = ServerEngine([sys.executable, "-c", "raise SystemExit('no GPU here, says the server')"],
                       port=free_port(), startup_timeout=30, log_dir=tmp_path)
    with pytest.raises(EngineError, match=r"exited with code 1 while starting .*\n.*no GPU here, says the server"):
        eng.start()


@pytest.mark.parametrize(("code", "words"), [
    (0, "exited with code 0"), (1, "exited with code 1"), (None, "exited with code None"),
    (-15, "was killed by SIGTERM (signal 15)"), (-9, "was killed by SIGKILL (signal 9; the OOM killer"),
    (-200, "was killed by signal 200"),
])
def test_exited_names_the_signal(code, words):
    from pytest_miles.placement.processes import exited

    assert exited(code).startswith(words)


def test_server_killed_by_a_signal_at_start_says_which(tmp_path):
    """A server that dies of SIGKILL while starting (SGLang kills its own tree when its scheduler dies; or
    the OOM killer) is reported by the signal's name, not as "exit code -9", with the log's last lines."""
    code = "import os, signal; print('scheduler died', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    eng = ServerEngine([sys.executable, "-c", code], port=free_port(), startup_timeout=30, log_dir=tmp_path)
    with pytest.raises(EngineError, match=r"was killed by SIGKILL \(signal 9; the OOM killer.*\) while starting "
                                          r".*\n.*scheduler died") as err:
        eng.start()
    assert "code -9" not in str(err.value)


def test_port_already_in_use(model_dir, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(EngineError, match=f"port {port} on 127.0.0.1 is already in use"):
            ReferenceServerEngine(model_dir, port=port, log_dir=tmp_path).start()


def test_one_switch_one_name_the_old_keyword_still_works():
    """`deterministic=` is the switch's name everywhere; `batch_invariant=` (the embedded engine's
    earlier name) still works, with a DeprecationWarning, and reads back under both names."""
    from pytest_miles.engines.reference import ReferenceEngine

    with pytest.warns(DeprecationWarning, match="use deterministic="):
        old = ReferenceEngine(batch_invariant=True)
    new = ReferenceEngine(deterministic=True)
    assert old.deterministic and old.batch_invariant and new.deterministic
    assert old.server_info()["enable_deterministic_inference"] is True
