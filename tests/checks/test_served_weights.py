"""The served weights are the trainer's (issue #16): SGLang's /get_weights_by_name as the embedded
engines answer it (in process and behind the real HTTP server subprocess), read back and compared
bitwise with an HF checkpoint, a state dict, and a real megatron-core trainer's weights (gloo)
after a GRPO step and a weight sync. The negative controls are real: a copy of the checkpoint with
one flipped bit, and an engine whose weights were not synced after the trainer's step."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

torch = pytest.importorskip("torch")

from pytest_miles import assert_served_weights_equal  # noqa: E402
from pytest_miles.engines.base import EngineError, WeightNotServed  # noqa: E402
from pytest_miles.engines.reference import ReferenceEngine  # noqa: E402
from pytest_miles.engines.reference_server_engine import ReferenceServerEngine  # noqa: E402
from pytest_miles.models.embedded import TinyConfig, write_hf_checkpoint  # noqa: E402
from tests.helpers.http import request_json  # noqa: E402

pytestmark = pytest.mark.timeout(180)
FLIPPED = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny"), TinyConfig(), dtype="bfloat16")


@pytest.fixture(scope="module")
def flipped(ckpt, tmp_path_factory):
    """NEGATIVE CONTROL: a copy of the checkpoint with one bit of one bf16 weight flipped."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("flipped")
    shutil.copy(ckpt / "config.json", out / "config.json")
    state = load_file(str(ckpt / "model.safetensors"))
    w = state[FLIPPED].view(torch.int16).clone()
    w[5, 7] ^= 1  # the lowest mantissa bit
    state[FLIPPED] = w.view(torch.bfloat16)
    save_file(state, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    with ReferenceServerEngine(ckpt, log_dir=tmp_path_factory.mktemp("logs"), threads=1) as s:
        yield s


def test_served_weights_equal_the_checkpoint(ckpt, flipped):
    engine = ReferenceEngine(ckpt)
    report = assert_served_weights_equal(engine, ckpt)
    n = sum(v.numel() for v in engine.model.w.values())
    assert report.tensors == 27 and report.elements == n and not report.partial, report.render()
    print(report.render())
    with pytest.raises(AssertionError) as exc:  # the negative control is caught and named
        assert_served_weights_equal(engine, flipped)
    msg = str(exc.value)
    assert f"{FLIPPED} at index [5, 7]" in msg and "1 of 27 tensors" in msg and "1 of 32768 elements" in msg, msg
    assert "bfloat16 bits 0x" in msg and "float32 bits 0x" in msg, msg


def test_truncate_size_reads_first_rows_and_says_so(ckpt):
    engine = ReferenceEngine(ckpt)
    rows = engine.get_weights_by_name("model.embed_tokens.weight", 3)
    assert len(rows) == 3 and len(rows[0]) == 128  # SGLang: tolist()[:truncate_size], rows of float32
    assert len(engine.get_weights_by_name("model.norm.weight")) == 100  # SGLang's default truncate_size
    report = assert_served_weights_equal(engine, ckpt, names=["lm_head.weight", "model.norm.weight"], truncate_size=4)
    assert report.elements == 4 * 128 + 4 and report.partial == [("lm_head.weight", 4, 512),
                                                                   ("model.norm.weight", 4, 128)]
    assert "only the first rows were read for 2 tensor(s) (8 rows of 640)" in report.render()


def test_tied_lm_head_answers_the_embedding_as_sglang_does(tmp_path):
    cfg = TinyConfig(tie_word_embeddings=True, num_hidden_layers=1)
    engine = ReferenceEngine(write_hf_checkpoint(tmp_path, cfg, dtype="bfloat16"))
    assert engine.get_weights_by_name("lm_head.weight", 2) == engine.get_weights_by_name("model.embed_tokens.weight", 2)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in state
    assert_served_weights_equal(engine, {"lm_head.weight": state["model.embed_tokens.weight"]})


def test_real_server_subprocess_serves_the_checkpoint(server, ckpt, flipped):
    report = assert_served_weights_equal(server, ckpt)
    assert report.tensors == 27 and report.engine == "reference-server", report.render()
    with pytest.raises(AssertionError, match=rf"{FLIPPED} at index \[5, 7\]"):
        assert_served_weights_equal(server, flipped)
    # SGLang's request and answers on the wire (http_server.py, io_struct.py)
    url = server.url + "/get_weights_by_name"

    def call(body, method="POST"):
        return request_json(url, body, method, timeout=30)

    code, rows = call({"name": "model.layers.0.self_attn.k_proj.bias", "truncate_size": 2}, "GET")
    assert code == 200 and len(rows) == 2 and all(isinstance(x, float) for x in rows)
    assert call({"name": "model.layers.0.self_attn.qkv_proj.weight"}) == (
        400, {"error": {"message": "Get parameter by name failed"}})
    assert call({"truncate_size": 2})[0] == 422 and call({"name": 3})[0] == 422
    assert call({"name": "model.norm.weight", "truncate_size": "x"})[0] == 422
    with pytest.raises(WeightNotServed, match="HTTP 400 \"Get parameter by name failed\" for 'nope'"):
        server.get_weights_by_name("nope")


def test_bad_inputs_are_named(ckpt, tmp_path):
    engine = ReferenceEngine(ckpt)
    with pytest.raises(AssertionError, match=r"serves no weight named 'model.extra.weight'.*sglang#5066"):
        assert_served_weights_equal(engine, {"model.extra.weight": torch.zeros(2, 2)})
    with pytest.raises(WeightNotServed, match="no parameter of that name"):
        engine.get_weights_by_name("model.layers.0.self_attn.qkv_proj.weight")
    with pytest.raises(TypeError, match="engine 'object' .*has no get_weights_by_name"):
        assert_served_weights_equal(object(), ckpt)
    with pytest.raises(TypeError, match="expected: int"):
        assert_served_weights_equal(engine, 3)
    with pytest.raises(TypeError, match=r"expected\['a'\]: list"):
        assert_served_weights_equal(engine, {"a": [1.0]})
    with pytest.raises(ValueError, match="names: 'nope' is not in the expected weights"):
        assert_served_weights_equal(engine, ckpt, names=["nope"])
    with pytest.raises(TypeError, match="names: 'model.norm.weight'; expected a list"):
        assert_served_weights_equal(engine, ckpt, names="model.norm.weight")
    with pytest.raises(ValueError, match="truncate_size 0: expected a positive integer"):
        assert_served_weights_equal(engine, ckpt, truncate_size=0)
    with pytest.raises(ValueError, match="is not a directory"):
        assert_served_weights_equal(engine, tmp_path / "missing")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(ValueError, match=r"no \*.safetensors \(pytorch_model.bin are pickles: never unpickled"):
        assert_served_weights_equal(engine, tmp_path / "pickled")
    with pytest.raises(ValueError, match="megatron-core names .* need config="):
        assert_served_weights_equal(engine, {"decoder.final_layernorm.weight": torch.ones(128)})
    with pytest.raises(ValueError, match="tp_size 2; SGLang's get_weights_by_name answers this rank's shard"):
        class TwoRanks:
            name = "tp2"
            get_weights_by_name = engine.get_weights_by_name

            def server_info(self):
                return {"tp_size": 2}

        assert_served_weights_equal(TwoRanks(), ckpt)


def test_a_server_that_stops_answering_is_named(ckpt, tmp_path):
    """A non-answer: the request is bounded by the engine's request timeout and names it."""
    import os
    import signal

    eng = ReferenceServerEngine(ckpt, log_dir=tmp_path, threads=1, request_timeout=2).start()
    try:
        eng.server_info()  # read once and kept: the weights request is what meets the stopped server
        os.kill(eng.proc.pid, signal.SIGSTOP)
        with pytest.raises(EngineError, match="did not answer during /get_weights_by_name"):
            assert_served_weights_equal(eng, ckpt, names=["model.norm.weight"])
        os.kill(eng.proc.pid, signal.SIGCONT)
    finally:
        eng.close()


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core not installed")
def test_served_weights_equal_the_megatron_trainers_after_a_step_and_sync(megatron_trainer_factory, ckpt, tmp_path):
    """Real megatron-core on gloo: the trainer loads the checkpoint, takes a GRPO step, exports;
    the engine reloads. Its served weights equal the trainer's own state dict (megatron names,
    converted with the project's converter); before the sync they did not (negative control)."""
    from dataclasses import asdict

    from safetensors.torch import load_file

    from pytest_miles.trainers.megatron import ModelArgs

    cfg = TinyConfig()
    trainer = megatron_trainer_factory(seed=1, model=ModelArgs.qwen2(cfg, seq_length=32, rotary_interleaved=True))
    engine = ReferenceEngine(ckpt)
    with trainer.session(init_hf=ckpt, hf_config=asdict(cfg)) as session:
        before = load_file(str(session.export_state(tmp_path / "before.safetensors")))
        print(assert_served_weights_equal(engine, before, config=cfg).render())
        prompt, cont = [5, 6, 7, 8], [9, 10, 11]
        ref = engine.score(prompt, cont)
        session.train_step([{"tokens": prompt + cont, "prompt_len": 4, "advantage": 1.0, "old_logprobs": ref},
                            {"tokens": prompt + [3, 4, 12], "prompt_len": 4, "advantage": -1.0, "old_logprobs": ref}])
        after = load_file(str(session.export_state(tmp_path / "after.safetensors")))
        with pytest.raises(AssertionError, match="served weights differ from the megatron-core state dict"):
            assert_served_weights_equal(engine, after, config=cfg)  # not synced yet: caught
        engine.update_weights_from_disk(session.export_hf(tmp_path / "synced"))
    report = assert_served_weights_equal(engine, after, config=cfg)
    assert report.tensors == 27, report.render()
    print(report.render())


def test_an_fp8_checkpoint_is_compared_as_written(tmp_path):
    """The helper's FP8 path: the quantized float8_e4m3fn tensors are compared as written and the
    scales listed as not compared; a flipped FP8 bit is named with its 8-bit pattern. (The
    reference engine only holds the file's tensors widened to float32: it is not an FP8 server;
    SGLang serving FP8 is tests/gpu/test_gpu_served_weights.py.)"""
    from safetensors.torch import load_file

    from pytest_miles.models.quantized_checkpoints import TINY128, write_quantized_checkpoint

    fp8 = write_quantized_checkpoint(tmp_path / "fp8", "fp8_blockwise", TINY128)
    engine = ReferenceEngine(fp8)
    report = assert_served_weights_equal(engine, fp8)
    assert "fp8 checkpoint" in report.source and "as written" in report.source
    assert len(report.not_compared) == 14 and all(n.endswith("_scale_inv") for n, _ in report.not_compared)
    state = load_file(str(fp8 / "model.safetensors"))
    w = state["model.layers.0.self_attn.o_proj.weight"].view(torch.uint8).clone()
    w[1, 2] ^= 1  # NEGATIVE CONTROL: one bit of one FP8 weight
    state["model.layers.0.self_attn.o_proj.weight"] = w.view(torch.float8_e4m3fn)
    with pytest.raises(AssertionError, match=r"o_proj.weight at index \[1, 2\]: .*float8_e4m3fn bits 0x[0-9a-f]{2}\)"):
        assert_served_weights_equal(engine, state)


def test_safetensors_dir_reader_refuses_hostile_files(ckpt, tmp_path):
    """The one HF-dir reader (engines, trainer init, quantizer, this check): a FIFO named like a
    shard is refused by name without blocking, garbage is named, the inputs are left as they were."""
    import os

    from pytest_miles._files import CheckpointError
    from pytest_miles.models.embedded import load_safetensors_dir

    fifo = tmp_path / "fifo"
    shutil.copytree(ckpt, fifo)
    (fifo / "model-00002.safetensors").unlink(missing_ok=True)
    os.mkfifo(fifo / "model-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"model-00002\.safetensors: cannot be read \(a FIFO"):
        load_safetensors_dir(fifo)
    with pytest.raises(CheckpointError, match="a FIFO"):
        assert_served_weights_equal(ReferenceEngine(ckpt), fifo)
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    garbage = bad / "model-00002.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"model-00002\.safetensors: not a readable safetensors file"):
        load_safetensors_dir(bad)
    assert garbage.read_bytes() == b"\xff" * 64
