"""The RL loop end to end on CPU: real megatron-core on gloo (a trainer session whose ranks stay
up across iterations), the reference engine in-process and behind its HTTP server. Runs are
shared between tests through module fixtures (a 3-iteration loop costs ~8 s here)."""

from __future__ import annotations

import copy
import importlib.util

import pytest

from pytest_miles.checks.loop import MAX_CHARS, TROUBLESHOOTING
from pytest_miles.scenarios.loop import LoopRun, assert_loops_bitwise_equal, first_divergence

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core not installed"),
              pytest.mark.timeout(300)]
ITERATIONS = 3


@pytest.fixture(scope="module")
def straight(rl_loop_factory) -> LoopRun:
    return rl_loop_factory.shared("straight", engine="reference", iterations=ITERATIONS, seed=1234, name="straight")


@pytest.fixture(scope="module")
def server_run(rl_loop_factory) -> LoopRun:
    return rl_loop_factory.shared("server", engine="reference-server", iterations=ITERATIONS, seed=1234,
                                  name="server")


def test_two_loops_bitwise_equal(rl_loop_factory, straight, miles_record):
    again = rl_loop_factory("reference", iterations=ITERATIONS, seed=1234, name="again")
    assert_loops_bitwise_equal(straight, again)
    last = straight.records[-1]
    assert len(straight.records) == ITERATIONS and last.iteration == ITERATIONS
    # the loop really learned something and the trainer saw what the engine sampled
    assert any(r.rewards != straight.records[0].rewards for r in straight.records[1:])
    assert all(0.0 < r.train_rollout_logprob_abs_diff < 1e-3 for r in straight.records), \
        [r.train_rollout_logprob_abs_diff for r in straight.records]
    assert straight.records[0].weights_manifest != straight.records[1].weights_manifest
    # the loop's rollout and trainer logprobs as a parity report: per token, first token apart, no identity error
    from pytest_miles.checks.parity import loop_parity

    parity = loop_parity(straight.records)
    f = parity.pairs["train_vs_decode"]
    assert not parity.identity and f.tokens == sum(len(t) for r in straight.records for g in r.tokens for t in g)
    assert f.mean_abs == pytest.approx(sum(r.train_rollout_logprob_abs_diff for r in straight.records) / ITERATIONS)
    # every sync took effect: served == the trainer's live parameters, changed where those changed
    assert all(r.sync["passed"] and r.sync["changed"] > 0 and r.sync["iteration"] == r.iteration
               for r in straight.records), [r.sync for r in straight.records]
    miles_record("RL loop run twice (reference engine + megatron-core gloo)", iterations=ITERATIONS,
                 train_rollout_logprob_abs_diff=last.train_rollout_logprob_abs_diff, final_loss=last.loss,
                 **{f"{k}_s": round(v, 2) for k, v in straight.stage_seconds().items()})


def test_resume_after_iteration_1_equals_straight(rl_loop_factory, straight):
    resumed = rl_loop_factory("reference", iterations=ITERATIONS, seed=1234, stop_after=1, name="resumed")
    assert resumed.notes and "resumed from" in resumed.notes[0]
    assert_loops_bitwise_equal(straight, resumed)


def test_reference_server_loops_bitwise_equal(rl_loop_factory, server_run, straight):
    """Two loops through the HTTP engine (weights pushed by POST /update_weights_from_disk) are
    equal; and equal to the in-process engine's loop (same model code, same bits)."""
    again = rl_loop_factory("reference-server", iterations=ITERATIONS, seed=1234, name="server-again")
    assert_loops_bitwise_equal(server_run, again)
    assert_loops_bitwise_equal(straight, server_run)


# ---- negative controls: a fault must be found at the stage it is in --------------------------


def _expect(found, iteration: int, stage: str, not_applicable: str | None = None):
    """The divergence must be at (iteration, stage). `not_applicable`: why equal loops can be a
    property of this machine rather than a broken check (then the control skips, saying so)."""
    if found is None and not_applicable:
        pytest.skip(f"not applicable on this machine: {not_applicable}")
    assert found is not None, "the loops compared equal: this control cannot fail here"
    assert (found.iteration, found.stage) == (iteration, stage), found.render()
    return found


def test_negative_control_engine_deterministic_off(rl_loop_factory, straight):
    """The reference engine's non-invariant mode (one batched forward over all 16 samples: BLAS
    picks another kernel than the one-row path) stands for SGLang without its flag."""
    off = rl_loop_factory("reference", iterations=1, seed=1234, engine_deterministic=False, name="engine-off")
    found = _expect(first_divergence(straight.records[:1], off), 1, "rollout",
                    "this CPU's BLAS gave the batched and the one-row forward the same bits")
    assert found.item.startswith("prompt 0, sample 0, token"), found.item
    with pytest.raises(AssertionError, match="iteration 1, stage rollout") as exc:
        assert_loops_bitwise_equal(straight.records[:1], off)
    assert TROUBLESHOOTING["rollout"] in str(exc.value)


def test_negative_control_trainer_deterministic_off(rl_loop_factory, straight):
    """megatron-core with deterministic_mode off and torch.use_deterministic_algorithms(False):
    on CPU the step takes another arithmetic path (the grad norm's last bits move), so the
    rollout of iteration 1 is equal and the divergence is named at the train stage."""
    off = rl_loop_factory("reference", iterations=1, seed=1234, trainer_deterministic=False, name="trainer-off")
    found = _expect(first_divergence(straight.records[:1], off), 1, "train",
                    "on this CPU torch's and megatron-core's deterministic switches change no kernel")
    assert "Flash-Attention 3" in found.render()


class SkipsSyncAt:
    """Negative control: a reference engine that ignores the weight update of one iteration (a
    stale or skipped sync, the engine still serving the weights it had)."""

    def __init__(self, engine, iteration: int) -> None:
        self.engine, self.skip, self.updates = engine, iteration, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def update_weights_from_disk(self, path) -> None:
        self.updates += 1
        if self.updates != self.skip + 1:  # the first update is the loop's start (the initial weights)
            self.engine.update_weights_from_disk(path)


def test_negative_control_stale_sync_named_at_its_iteration(rl_loop_factory, tmp_path):
    from pytest_miles.engines.reference import ReferenceEngine
    from pytest_miles.scenarios.loop.factory import LoopFactory

    def engines(kind, model, deterministic, **opts):
        return SkipsSyncAt(ReferenceEngine(model, deterministic=deterministic), 2)

    loops = LoopFactory(engine_factory=engines, make_trainer=rl_loop_factory.make_trainer, work_root=tmp_path)
    with pytest.raises(AssertionError, match=r"iteration 2: weight sync did nothing for \d+ of the \d+ tensors"):
        loops("reference", iterations=2, seed=1234, n_prompts=2, n_samples=2, max_new_tokens=4, name="stale")


def test_negative_control_different_seed(rl_loop_factory, straight):
    other = rl_loop_factory("reference", iterations=1, seed=4321, name="other-seed")
    found = _expect(first_divergence(straight.records[:1], other), 1, "rollout")
    assert found.item == "prompt 0"


# ---- the report itself (no new runs) ----------------------------------------------------------


def test_divergence_named_by_iteration_stage_and_item(straight):
    b = copy.deepcopy(straight)
    b.name = "edited"
    b.records[1].loss_bits = float(b.records[1].loss * 1.5 + 1.0).hex()
    with pytest.raises(AssertionError) as exc:
        assert_loops_bitwise_equal(straight, b)
    text = str(exc.value)
    assert "iteration 2, stage train: loss at step 2" in text and "straight and edited" in text
    assert "NCCL_ALGO" in text and "cuDNN" in text and len(text) <= MAX_CHARS

    c = copy.deepcopy(straight)
    key = sorted(c.records[2].weights_manifest)[0]
    c.records[2].weights_manifest[key] = "0" * 64
    c.records[2].weights = "/nonexistent"  # values gone: the manifest digest names the tensor
    found = first_divergence(straight, c)
    assert (found.iteration, found.stage) == (3, "weight_sync") and key in found.item

    d = copy.deepcopy(straight)
    d.records[0].tokens[2][3][5] += 1
    found = first_divergence(straight, d)
    assert (found.iteration, found.stage, found.item) == (1, "rollout", "prompt 2, sample 3, token 5")
    assert first_divergence(straight, copy.deepcopy(straight)) is None


def test_checkpoint_divergence_names_tensor_and_index(straight, tmp_path):
    """With both checkpoints on disk, a changed manifest entry is resolved to the tensor and
    index by pytest_miles.checks (the values are read, not only the digests)."""
    import shutil

    import torch  # noqa: F401  (the checkpoint layer reads tensors)

    from pytest_miles.checks.checkpoints import compare_checkpoints

    c = copy.deepcopy(straight)
    rec = c.records[0]
    other = tmp_path / "ckpt"
    shutil.copytree(straight.records[1].checkpoint, other)  # iteration 2's weights stand in for 1's
    rec.checkpoint = str(other)
    rec.checkpoint_manifest = dict(straight.records[1].checkpoint_manifest)
    found = first_divergence(straight, c)
    assert (found.iteration, found.stage) == (1, "train") and "tensor" in found.item, found
    assert compare_checkpoints(straight.records[0].checkpoint, other, first=True).first.name in found.item


def test_weight_sync_divergence_reads_the_pushed_weights(straight):
    """The weights pushed to the engine are an HF checkpoint: a difference is named by tensor
    and index from the files (pytest_miles.checks reads the safetensors)."""
    c = copy.deepcopy(straight)
    c.records[0].weights = straight.records[1].weights
    c.records[0].weights_manifest = straight.records[1].weights_manifest
    found = first_divergence(straight, c)
    assert (found.iteration, found.stage) == (1, "weight_sync"), found
    assert "tensor " in found.item and "first differing element at [" in found.detail, found.render()


# ---- the trainer session: errors named, processes die with us ---------------------------------


def test_session_tied_embeddings_match_the_engine_and_errors_are_named(megatron_trainer_factory, tmp_path):
    """A Qwen2 with tied embeddings through the converter into real megatron-core and back: the
    trainer's logprobs match the reference engine's before and after a step and weight sync.
    Then the session's errors: bad arguments named before launch, a failing command with rank
    0's traceback, and close() ends every rank."""
    from dataclasses import asdict

    from pytest_miles.engines.reference import ReferenceEngine
    from pytest_miles.models.embedded import TinyConfig, write_hf_checkpoint
    from pytest_miles.trainers.megatron import ModelArgs, TrainerError

    cfg = TinyConfig(tie_word_embeddings=True)
    init = write_hf_checkpoint(tmp_path / "init", cfg, dtype="float32")
    trainer = megatron_trainer_factory(seed=1, model=ModelArgs.qwen2(cfg, seq_length=64, rotary_interleaved=True))
    with pytest.raises(TrainerError, match="init_hf .*: no config.json"):
        trainer.session(init_hf=tmp_path)
    with pytest.raises(TrainerError, match="load_dir .*: no latest_checkpointed_iteration.txt"):
        trainer.session(load_dir=tmp_path)
    session = trainer.session(init_hf=init, hf_config=asdict(cfg))
    procs = list(session.procs)
    try:
        engine = ReferenceEngine(init, deterministic=True)
        prompt, cont = [5, 6, 7, 8], [9, 10, 11]
        sample = {"tokens": prompt + cont, "prompt_len": len(prompt)}
        ref = engine.score(prompt, cont)
        assert max(abs(a - b) for a, b in zip(ref, session.logprobs([sample])[0])) < 1e-3
        session.train_step([{**sample, "advantage": 1.0, "old_logprobs": ref},
                            {**sample, "tokens": prompt + [3, 4, 12], "advantage": -1.0, "old_logprobs": ref}])
        engine.update_weights_from_disk(session.export_hf(tmp_path / "after"))
        after = engine.score(prompt, cont)
        assert after != ref and max(abs(a - b) for a, b in zip(after, session.logprobs([sample])[0])) < 1e-3
        with pytest.raises(TrainerError, match="(?s)'bogus' failed on rank 0:.*unknown command 'bogus'"):
            session.call("bogus")
    finally:
        session.close()
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(TrainerError, match="session is closed"):
        session.call("ready")


def test_session_ranks_die_with_their_parent(tmp_path):
    """SIGKILL the process that holds a session: its ranks see stdin close and exit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys; from pytest_miles.trainers.megatron import MegatronTrainer\n"
            f"s = MegatronTrainer(seed=1, log_dir={str(tmp_path)!r}).session()\n"
            "print(' '.join(str(p.pid) for p in s.procs), flush=True); sys.stdin.read()\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        pids = [int(x) for x in parent.stdout.readline().split()]
        assert pids, "the session reported no ranks"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 30
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if _alive(p)]
            time.sleep(0.2)
        assert not alive, f"rank(s) {alive} outlived their SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# ---- the engines' weight update ------------------------------------------------------------------


def test_engine_weight_update_refusals_are_named(tmp_path):
    from pytest_miles.engines.base import EngineError, SamplingParams
    from pytest_miles.engines.reference import ReferenceEngine
    from pytest_miles.engines.reference_server_engine import ReferenceServerEngine
    from pytest_miles.models.embedded import TinyConfig, write_hf_checkpoint

    a = write_hf_checkpoint(tmp_path / "a", TinyConfig(), dtype="float32")
    b = write_hf_checkpoint(tmp_path / "b", TinyConfig(seed=7), dtype="float32")
    wide = write_hf_checkpoint(tmp_path / "wide", TinyConfig(num_hidden_layers=3), dtype="float32")
    params = SamplingParams(max_new_tokens=4, sampling_seed=3)
    eng = ReferenceEngine(a, deterministic=True)
    before = eng.generate([[5, 6, 7]], params)[0].logprobs
    eng.update_weights_from_disk(b)
    assert eng.generate([[5, 6, 7]], params)[0].logprobs != before
    eng.update_weights_from_disk(a)
    assert eng.generate([[5, 6, 7]], params)[0].logprobs == before
    with pytest.raises(EngineError, match="describes another model"):
        eng.update_weights_from_disk(wide)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        eng.update_weights_from_disk(tmp_path)
    with ReferenceServerEngine(a, deterministic=True, threads=1, log_dir=tmp_path / "log").start() as server:
        assert server.generate([[5, 6, 7]], params)[0].logprobs == before
        with pytest.raises(EngineError, match="update_weights_from_disk.*describes another model"):
            server.update_weights_from_disk(wide)
        server.update_weights_from_disk(b)
        assert server.generate([[5, 6, 7]], params)[0].logprobs != before


@pytest.mark.parametrize(("a", "b", "expected"), [
    (None, None, "a: NoneType given"),
    ([1], [], "a: a list holding int given"),
    ([], "ab", "b: str given"),
])
def test_comparing_something_that_is_not_a_loop_is_named(a, b, expected):
    with pytest.raises(TypeError, match=expected):
        assert_loops_bitwise_equal(a, b)


def test_the_suites_sglang_loop_can_borrow_the_deterministic_engine(tmp_path):
    """The loop's SGLang weights differ from the default model shape's folder in nothing but the weight
    file (so the engine factory lends the suite's deterministic engine to it); the embedded engines'
    float32 weights do not (they get an engine of their own)."""
    from pytest_miles.engines.factory import same_but_weights
    from pytest_miles.models.cache import cached_shape_dir
    from pytest_miles.scenarios.loop.factory import LoopFactory

    shape = cached_shape_dir(tmp_path, "tiny")
    loops = LoopFactory(engine_factory=None, make_trainer=None, work_root=tmp_path / "loop")
    assert same_but_weights(str(shape), str(loops.init_weights("sglang")))
    assert not same_but_weights(str(shape), str(loops.init_weights("reference")))
