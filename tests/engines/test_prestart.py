"""Engines started in the background (EngineFactory.prestart) and lent for a block (EngineFactory.lend),
on real reference-server subprocesses: starts overlap, a pending start is taken instead of launching
again, a failed or stuck one is reported by the call that asks for it, close() stops them all, the
staggering waits for the previous server's memory line, and a lent engine gets its weights back."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from pytest_miles.engines.factory import EngineFactory, same_but_weights
from pytest_miles.engines.prestart import Pending, memory_fractions
from pytest_miles.engines.reference_server_engine import ReferenceServerEngine
from pytest_miles.errors import EngineError, InputError
from pytest_miles.models.embedded import write_hf_checkpoint

SERVER = {"kind": "reference-server", "threads": 1}
PROMPT = [[5, 17, 42, 99, 7, 3]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny"))


def factory(model_dir, tmp_path, **kw) -> EngineFactory:
    return EngineFactory(model_dir=lambda: str(model_dir), log_dir=tmp_path, hardware=lambda: None, device="cpu",
                         **kw)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_memory_fractions_share_the_gpu_and_keep_the_usual_fraction_for_two():
    assert memory_fractions(0) == []
    assert memory_fractions(2) == [0.3, 0.3]
    fr = memory_fractions(4)  # each takes 15% of what was free before the first, read at its own start
    free, held = 1.0, []
    for f in fr:
        held.append(f * free)
        free -= f * free
    assert held == pytest.approx([0.15] * 4, abs=1e-3) and sum(held) == pytest.approx(0.6, abs=1e-3)


def test_prestarted_engines_start_together_and_are_taken_not_launched_again(model_dir, tmp_path):
    f = factory(model_dir, tmp_path)
    try:
        labels = f.prestart([{**SERVER, "deterministic": True}, {**SERVER, "deterministic": False},
                             {**SERVER, "deterministic": True},  # the same configuration: one start
                             {"kind": "reference"}])  # in-process: started when asked, not in the background
        assert len(labels) == 2 and f.launches == 2, labels
        with f.lend(model=str(_other(model_dir, tmp_path)), deterministic=True, **SERVER) as lent:
            assert f.launches == 2 and len(f.pending) == 1  # lent from its background start
        a = f(deterministic=True, **SERVER)
        assert a is lent
        b = f(deterministic=False, **SERVER)
        assert f.launches == 2 and not f.pending  # taken from the background starts
        # overlap, shown by the timestamps: each spawned before the other answered
        assert a.spawned_at < b.ready_at and b.spawned_at < a.ready_at, (a.spawned_at, a.ready_at, b.spawned_at,
                                                                          b.ready_at)
        assert a.generate(PROMPT)[0].output_ids and b.generate(PROMPT)[0].output_ids
        f("reference")  # another configuration does not close the planned ones
        assert a.alive and b.alive and f.launches == 3
        pids = [a.proc.pid, b.proc.pid]
    finally:
        f.close()
    assert not a.alive and not b.alive and all(map(gone, pids))


def test_a_background_start_that_fails_or_hangs_is_the_error_of_the_call_that_asks(model_dir, tmp_path):
    f = factory(model_dir, tmp_path, startup_timeout=0.3)
    try:
        f.prestart([{**SERVER, "deterministic": True}])
        with pytest.raises(EngineError) as err:
            f(deterministic=True, **SERVER)
        text = str(err.value)
        assert "started in the background at session start, failed" in text, text
        assert "did not become healthy within 0.3 s" in text and "log " in text, text
        assert not f.live and not f.pending
    finally:
        f.close()


class MarkedServer(ReferenceServerEngine):
    """The reference server, with the line it prints once it is up standing in for SGLang's memory-pool
    line: the next background start must wait for it."""

    memory_marker = "reference server on"


def _marked(model_dir, tmp_path, deterministic):
    return lambda: MarkedServer(model_dir, deterministic=deterministic, threads=1, log_dir=tmp_path)


def test_a_start_waits_for_the_previous_servers_memory_line_and_close_stops_both(model_dir, tmp_path):
    first = Pending("first", _marked(model_dir, tmp_path, True), None, 120)
    second = Pending("second", _marked(model_dir, tmp_path, False), first.settled, 120)
    a, b = first.result(), second.result()
    try:
        assert a.settled_at is not None and b.spawned_at >= a.settled_at, (a.settled_at, b.spawned_at)
    finally:
        first.cancel()
        second.cancel()
    assert not a.alive and not b.alive
    # closed while the first is starting: it is killed, and the second never spawns
    first = Pending("first", _marked(model_dir, tmp_path, True), None, 120)
    second = Pending("second", _marked(model_dir, tmp_path, False), first.settled, 120)
    second.stop()  # the last first: stopping the first settles it, which would let an unmarked second begin
    first.stop()
    first.cancel()
    second.cancel()
    assert first.done.is_set() and second.done.is_set()
    assert second.engine is None or second.engine.spawned_at is None
    assert first.engine is None or first.engine.proc is None
    with pytest.raises(EngineError):
        second.result()


def _other(model_dir, tmp_path):
    """The model folder with other weights (every other file the same)."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v + 0.25 if k.endswith("weight") and v.dim() == 2 else v for k, v in weights.items()},
              str(other / "model.safetensors"))
    return other


def test_a_lent_engine_serves_the_other_weights_and_gets_its_own_back(model_dir, tmp_path):
    other = _other(model_dir, tmp_path)
    assert same_but_weights(str(model_dir), str(other)) and not same_but_weights(str(model_dir), str(model_dir))
    config = json.loads((other / "config.json").read_text())
    unlike = tmp_path / "unlike"
    shutil.copytree(other, unlike)
    (unlike / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    assert not same_but_weights(str(model_dir), str(unlike))

    f = factory(model_dir, tmp_path / "logs")
    try:
        eng = f(deterministic=True, **SERVER)
        before = eng.generate(PROMPT)[0]
        with f.lend(model=str(other), deterministic=True, **SERVER) as lent:
            assert lent is eng and f.launches == 1
            during = lent.generate(PROMPT)[0]
        after = eng.generate(PROMPT)[0]
        assert during.logprobs != before.logprobs  # the other weights were served
        assert (after.output_ids, after.logprobs) == (before.output_ids, before.logprobs)  # its own, bit for bit
    finally:
        f.close()


def test_close_stops_the_starts_under_way(model_dir, tmp_path):
    f = factory(model_dir, tmp_path)
    f.prestart([{**SERVER, "deterministic": True}, {**SERVER, "deterministic": False}])
    starts = list(f.pending.values())
    f.close()
    assert not f.pending and all(p.done.is_set() for p in starts)
    for p in starts:
        assert p.engine is None or (p.engine.proc is None and all(map(gone, p.engine.pids)))


# ---- servers with a small capped KV pool start beside the chain (engines/prestart.py) ---------------


def _sglang_spec(model_dir, tmp_path, *extra, deterministic=True, **options):
    from pytest_miles.engines.launch import EngineSpec

    return EngineSpec("sglang", str(model_dir), deterministic, "flashinfer", tuple(extra), options, "cuda",
                      str(tmp_path), 300.0)


def test_kv_bytes_per_token_as_sglang_sizes_its_pool():
    from pytest_miles.engines.prestart import kv_bytes_per_token
    from pytest_miles.models.embedded import SHAPES

    assert kv_bytes_per_token(SHAPES["tiny"].hf_config()) == 2 * 2 * 1 * 64 * 2  # K+V, 2 layers, 1 KV head
    assert kv_bytes_per_token(SHAPES["qwen2.5-0.5b"].hf_config()) == 2 * 24 * 2 * 64 * 2
    assert kv_bytes_per_token(SHAPES["tiny"].hf_config(), "fp8_e4m3") == 2 * 2 * 1 * 64
    assert kv_bytes_per_token({**SHAPES["tiny"].hf_config(), "kv_lora_rank": 512}) is None  # MLA: not this layout
    assert kv_bytes_per_token({"num_hidden_layers": 2}) is None
    tiny = {k: v for k, v in SHAPES["tiny"].hf_config().items() if k != "torch_dtype"}
    assert kv_bytes_per_token({**tiny, "dtype": "float32"}) == 2 * 2 * 1 * 64 * 4  # transformers 5 writes "dtype"


@pytest.mark.parametrize("bad", [{"num_attention_heads": "2"}, {"num_attention_heads": True},
                                 {"num_attention_heads": -2}, {"head_dim": 0, "hidden_size": None},
                                 {"layer_types": "full_attention"}])
def test_an_attention_layout_takes_only_positive_integers(bad):
    from pytest_miles.models.embedded import SHAPES
    from pytest_miles.models.shapes import attention_layout

    config = {**SHAPES["tiny"].hf_config(), **bad}
    before = dict(config)
    att = attention_layout(config)
    assert config == before  # read, never changed
    if "layer_types" in bad:
        assert not att.mixed_layers  # not a list: no layer types read
    else:
        assert att.heads is None or att.head_dim is None


@pytest.mark.parametrize("extra, beside", [
    ((), False),  # SGLang's own pool: in the chain
    (("--max-total-tokens", "2048"), True),
    (("--sglang-max-total-tokens=4096",), True),
    (("--max-total-tokens", "100000000"), False),  # capped, but large: in the chain
    (("--max-total-tokens", "many"), False),
])
def test_a_small_capped_pool_starts_beside_the_chain(model_dir, tmp_path, extra, beside):
    from pytest_miles.engines.prestart import BESIDE_FRACTION, SHARE, small_pool

    assert small_pool(_sglang_spec(model_dir, tmp_path, *extra)) is beside
    assert SHARE < BESIDE_FRACTION < 1  # its reading survives every chained server's planned share


def test_the_beside_fraction_survives_the_readings_an_h100_start_met():
    """SGLang 0.5.17 (mem_cache/kv_cache_configurator.py _profile_available_bytes) sizes the pool from
    `available - pre x (1 - fraction)` and refuses to start at <= 0. On an H100 (2026-12-05) a server
    beside four others and the megatron-core ranks read available = 0.2309 x pre ("minimum viable =
    1 - available/pre = 0.7691") and 0.75 refused it. BESIDE_FRACTION must leave its pool, the cap, with
    a tenth of the reading to spare: a small pool (<= 1 GiB), and a planned pool's server, whose own cap
    (0.3) stands in for the other planned pool it did not see allocated."""
    from pytest_miles.engines.prestart import BESIDE_FRACTION, DEFAULT_FRACTION, SHARE, SMALL_POOL_BYTES

    pre = 79.0  # GB free at the first reading (an H100's 80 GB, less a CUDA context)
    available = (1 - 0.7691) * pre

    def rest(fraction: float, others_less: float = 0.0) -> float:
        return available + others_less - pre * (1 - fraction)

    assert rest(0.75) <= 0  # the start that was refused
    assert rest(BESIDE_FRACTION) >= SMALL_POOL_BYTES / 1e9 + 0.1 * pre
    planned_cap = min(DEFAULT_FRACTION, SHARE / 2) * pre
    assert rest(BESIDE_FRACTION, others_less=planned_cap) >= planned_cap + 0.1 * pre
    assert BESIDE_FRACTION < 1  # SGLang's own headroom for activations is not zero


@pytest.mark.parametrize("shape", ["tiny", "qwen2.5-0.5b"])
def test_the_suites_capped_servers_start_beside_the_chain(tmp_path, shape):
    """The bundled suite's SGLang servers: traffic (both) and cache/API capped small by their own
    arguments; the control and deterministic servers are not (their pools are planned from the free GPU
    memory, planned_pools, or they start in the chain)."""
    from pytest_miles.engines.prestart import small_pool
    from pytest_miles.suite.conftest import engine_calls

    folder = _config_folder(tmp_path, shape, shape=shape)
    calls = engine_calls(lambda name: {"engine": "sglang", "attention_backend": "flashinfer"}[name], str(folder))
    beside = {name for name, call in calls.items()
              if small_pool(_sglang_spec(folder, tmp_path, *call.get("extra_args", ()),
                                         deterministic=call["deterministic"],
                                         **({"env": call["env"]} if "env" in call else {})))}
    assert beside == {"traffic", "traffic-control", "cache-api"}


# ---- pools planned in advance: every server beside the others (engines/prestart.py planned_pools) ----


def _config_folder(tmp_path, name="m", shape="tiny", **config):
    """A model folder holding only the config.json of an embedded shape (what pool planning reads)."""
    from pytest_miles.models.embedded import SHAPES

    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**SHAPES[shape].hf_config(), **config}))
    return folder


def test_pools_planned_in_tokens_of_each_model(tmp_path):
    from pytest_miles.engines.prestart import SHARE, planned_pools

    free = 100 << 30
    a, b = _sglang_spec(_config_folder(tmp_path, "a"), tmp_path), _sglang_spec(_config_folder(tmp_path, "b"), tmp_path,
                                                                               deterministic=False)
    capped = _sglang_spec(_config_folder(tmp_path, "c"), tmp_path, "--max-total-tokens", "2048")
    pools = planned_pools({"a": a, "b": b, "capped": capped}, free)
    assert pools == {"a": int(SHARE * free / 2 // 512), "b": int(SHARE * free / 2 // 512)}  # 512 B a token
    assert planned_pools({"a": a}, free) == {"a": int(0.3 * free // 512)}  # alone: the usual fraction, no more


@pytest.mark.timeout(60)  # a config.json that is a FIFO must never be opened and waited on
@pytest.mark.parametrize("why", ["no free memory reading", "the user's own fraction", "a layout not known here",
                                 "a config.json that is a FIFO", "a config.json that is no JSON object"])
def test_without_a_plan_for_every_server_all_stay_in_the_chain(tmp_path, why):
    from pytest_miles.engines.prestart import planned_pools, small_pool

    a = _sglang_spec(_config_folder(tmp_path, "a"), tmp_path)
    if why == "the user's own fraction":
        b = _sglang_spec(_config_folder(tmp_path, "b"), tmp_path, "--mem-fraction-static", "0.4")
    elif why == "a layout not known here":
        b = _sglang_spec(_config_folder(tmp_path, "b", kv_lora_rank=512), tmp_path)
    elif why.startswith("a config.json"):
        folder = tmp_path / "b"
        folder.mkdir()
        if "FIFO" in why:  # refused by name where the engine's configuration is made, never opened
            os.mkfifo(folder / "config.json")
            with pytest.raises(InputError, match=r"engine_factory\(model=\): .*/b' is not a model folder"):
                _sglang_spec(folder, tmp_path)
            return
        (folder / "config.json").write_text("[1, 2]")
        b = _sglang_spec(folder, tmp_path)
        assert not small_pool(_sglang_spec(folder, tmp_path, "--max-total-tokens", "2048"))
    else:
        b = _sglang_spec(_config_folder(tmp_path, "b"), tmp_path)
    free = None if why == "no free memory reading" else 100 << 30
    assert planned_pools({"a": a, "b": b}, free) == {}


def test_a_planned_pool_reaches_sglangs_command_line(tmp_path):
    from pytest_miles.engines.server import SGLangEngine

    cmd = SGLangEngine(_config_folder(tmp_path), log_dir=tmp_path, max_total_tokens=123456).cmd
    assert cmd[cmd.index("--max-total-tokens") + 1] == "123456"
    assert "--max-total-tokens" not in SGLangEngine(_config_folder(tmp_path, "n"), log_dir=tmp_path).cmd
    for bad in ("many", 0, 1.5, True):
        with pytest.raises(InputError, match=r"SGLangEngine\(max_total_tokens=\)"):
            SGLangEngine(_config_folder(tmp_path, f"bad-{bad}"), log_dir=tmp_path, max_total_tokens=bad)


def test_no_free_memory_reading_without_nvml_or_a_gpu():
    from pytest_miles.facts.hardware import gpu_free_bytes

    assert gpu_free_bytes(None) is None
    assert gpu_free_bytes("GPU-00000000-0000-0000-0000-000000000000") is None
