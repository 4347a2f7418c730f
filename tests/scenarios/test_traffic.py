"""Determinism under load on the embedded reference server (a real subprocess with its dynamic-
batching scheduler): the invariant server passes with the stress witnessed; with invariance off it
is caught and the variance named; a planted top-k fault and a stalled client are caught (negative
controls, named as such)."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("torch")

from pytest_miles.engines.reference_server_engine import ReferenceServerEngine  # noqa: E402
from pytest_miles.errors import InputError, NotApplicable  # noqa: E402
from pytest_miles.models.embedded import write_hf_checkpoint  # noqa: E402
from pytest_miles.scenarios.traffic import (  # noqa: E402
    assert_deterministic_under_load,
    make_traffic,
    reordered,
    traffic_negative_control,
)

SHAPE = {"max_prompt": 70, "max_new_tokens": 12, "spread_s": 0.05}  # near-simultaneous: the pool fills
PRESSURE = {"max_total_tokens": 128, "chunked_prefill_size": 16, "threads": 1}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def invariant(model_dir, tmp_path_factory):
    with ReferenceServerEngine(model_dir, deterministic=True, prefix_cache=True,
                               log_dir=tmp_path_factory.mktemp("logs"), **PRESSURE) as s:
        yield s


def test_invariant_server_passes_under_load_with_the_stress_witnessed(invariant):
    report = assert_deterministic_under_load(invariant, 24, seed=3, **SHAPE)
    w = report.witnesses
    assert w["retractions"] >= 1 and w["chunked_prefills"] >= 1 and w["max_running_batch"] >= 2, report.render()
    assert w["cached_tokens"] >= 1, report.render()  # requests of one group share their prompt: cache hits


SMALL = {"page_size": 16, "max_len": 17}


def test_systematic_compositions_pass_on_the_invariant_server(invariant):
    from pytest_miles.checks.compositions import assert_composition_invariant
    from pytest_miles.engines.base import SamplingParams

    got = assert_composition_invariant(invariant, params=SamplingParams(temperature=0.0, max_new_tokens=2), **SMALL)
    assert got["items"] == 4 + 24 + 12 + 8  # singletons, ordered pairs, cyclic windows, adjacent duplicates


def test_without_the_stress_it_is_not_applicable(invariant):
    with pytest.raises(NotApplicable, match="no retractions"):  # 2 short requests cannot fill the pool
        assert_deterministic_under_load(invariant, 2, seed=1, max_prompt=4, max_new_tokens=2, spread_s=0.0,
                                        required=("retractions",))


class PlantedTopKFault:
    """NEGATIVE CONTROL (a fake on purpose): the real server, but one traffic answer has one top-k
    entry that is not the chosen token moved by one ulp."""

    def __init__(self, engine):
        self.engine, self.calls, self.planted = engine, 0, None
        self.name, self.deterministic = engine.name, engine.deterministic

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate_one(self, prompt, params, **kw):
        import math

        out = self.engine.generate_one(prompt, params, **kw)
        self.calls += 1
        if self.planted is None and self.calls > 3 and out.top_logprobs:
            row = out.top_logprobs[0]
            tok = next(t for t in row if t != out.output_ids[0])
            row[tok] = math.nextafter(row[tok], 0.0)
            self.planted = tok
        return out


def test_negative_control_a_planted_fault_in_one_top_k_entry_is_caught(invariant):
    faulty = PlantedTopKFault(invariant)
    with pytest.raises(AssertionError, match="top-k at token 0: token id") as exc:
        assert_deterministic_under_load(faulty, 6, seed=5, **SHAPE)
    assert f"token id {faulty.planted} " in str(exc.value)


class StalledClient:
    """NEGATIVE CONTROL (a fake on purpose): one request never returns."""

    def __init__(self, engine):
        self.engine, self.gate, self.calls = engine, threading.Event(), 0
        self.name = engine.name

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate_one(self, prompt, params, **kw):
        self.calls += 1
        if self.calls == 2:
            self.gate.wait(30)
        return self.engine.generate_one(prompt, params, **kw)


def test_negative_control_a_stall_is_reported_with_the_engines_queue_and_pool(invariant):
    stalled = StalledClient(invariant)
    try:
        stall = r"stall under load: 1 of 4 requests unfinished .*num_queue_reqs"
        with pytest.raises(AssertionError, match=stall) as exc:
            assert_deterministic_under_load(stalled, 4, seed=2, stall_timeout=1.0, **SHAPE)
        assert "; its log ends (our own polling left out):\n" in str(exc.value)  # the server's words, if it has a log
    finally:
        stalled.gate.set()


class CompilingClient(StalledClient):
    """NEGATIVE CONTROL (a fake on purpose): one request waits while a process named like a kernel compiler
    (a copy of `sleep` called ninja, a child of the "engine" process) runs, as a server's JIT build does."""

    def __init__(self, engine, tmp_path, seconds: float):
        import shutil
        import sys

        from pytest_miles.placement.ownership import spawn

        super().__init__(engine)
        ninja = tmp_path / "ninja"
        shutil.copy(shutil.which("sleep"), ninja)
        code = f"import subprocess, time; subprocess.run([{str(ninja)!r}, {str(seconds)!r}]); time.sleep(60)"
        self.proc = spawn([sys.executable, "-c", code])  # dies with this pytest, however it dies


def test_a_kernel_compile_under_the_engine_is_not_a_stall_but_is_bounded_and_named(invariant, tmp_path):
    """A determinism-off SGLang server stalled for 120 s under traffic on a loaded H200 (2026-12-04), its first
    sampled batch waiting on a kernel build. While the engine's processes run a compiler the wait goes on (the
    compile time is a witness); past the grace it is a stall that names the compilers."""
    from pytest_miles.placement.processes import kill_tree
    from pytest_miles.scenarios.traffic import run_traffic

    slow = CompilingClient(invariant, tmp_path, 4.0)
    try:
        threading.Timer(3.0, slow.gate.set).start()  # the "kernel" is built after 3 s; the stall limit is 1 s
        report = run_traffic(slow, 4, seed=2, stall_timeout=1.0, **SHAPE)
        assert report.witnesses["compilers"] == ["ninja"] and report.witnesses["compile_seconds"] >= 1, report.render()
    finally:
        slow.gate.set()
        kill_tree(slow.proc.pid)
    endless = CompilingClient(invariant, tmp_path, 60.0)
    try:
        with pytest.raises(AssertionError, match=r"(?s)stall under load: 1 of 4 .* ran kernel compilers \(ninja\)"):
            run_traffic(endless, 4, seed=2, stall_timeout=1.0, compile_grace=2.0, **SHAPE)
    finally:
        endless.gate.set()
        kill_tree(endless.proc.pid)


def test_negative_control_invariance_off_is_caught_and_the_variance_named(model_dir, tmp_path):
    from pytest_miles.checks.compositions import assert_composition_invariant
    from pytest_miles.engines.base import SamplingParams

    with ReferenceServerEngine(model_dir, deterministic=False, log_dir=tmp_path, **PRESSURE) as s:
        report = traffic_negative_control(s, 16, seed=3, **SHAPE)
        with pytest.raises(AssertionError, match="batch composition variance"):  # the compositions catch it too
            assert_composition_invariant(s, params=SamplingParams(temperature=0.0, max_new_tokens=2), **SMALL)
    assert "batch composition" in report.variances, report.render()
    assert "variance caught: batch composition" in report.render()


def test_traffic_is_seeded_mixed_and_reordered():
    a, b = make_traffic(40, seed=7), make_traffic(40, seed=7)
    assert a == b
    temps = {r.params.temperature for r in a}
    assert 0.0 in temps and len(temps) > 2 and {r.stream for r in a} == {True, False}
    assert len({r.params.sampling_seed for r in a}) == 40 and any(r.params.min_p for r in a)
    assert {1, 16, 17, 64, 129} <= {len(r.prompt) for r in a}
    from pytest_miles.checks.compositions import boundary_lengths

    bounds, long = set(boundary_lengths(16, 1200)), make_traffic(200, seed=7, max_prompt=1200)
    drawn = [len(r.prompt) for r in long[::2]]
    assert sum(n not in bounds for n in drawn) >= 30 and max(drawn) > 600  # half the prompts of random length
    assert all(a[i].prompt == a[i + 1].prompt for i in range(0, 40, 2))  # groups of two samples per prompt
    other = reordered(a, 1)
    assert [r.prompt for r in other] == [r.prompt for r in a] and [r.arrival for r in other] != [r.arrival for r in a]
    with pytest.raises(InputError, match="n_requests"):
        make_traffic(1)


def test_min_p_can_be_left_out_and_filters_made_universal_with_every_other_parameter_as_drawn():
    from dataclasses import replace

    with_min_p, without = make_traffic(40, seed=7), make_traffic(40, seed=7, min_p=False)
    assert any(r.params.min_p for r in with_min_p) and not any(r.params.min_p for r in without)
    assert [replace(r, params=replace(r.params, min_p=0.0)) for r in with_min_p] == without
    filtered = make_traffic(40, seed=7, filtered=True)
    unfiltered = [r for r in with_min_p if r.params.temperature > 0 and r.params.top_k == -1 and r.params.top_p == 1]
    assert unfiltered, "the mix has unfiltered sampled requests to begin with"
    for a, b in zip(with_min_p, filtered):
        if a in unfiltered:
            assert b.params.top_k == 40 and replace(b, params=replace(b.params, top_k=-1)) == a
        else:
            assert a == b


def test_the_capability_data_names_the_batchmate_dependent_seeded_sampler():
    from pytest_miles.capabilities import load_capabilities

    cap = load_capabilities().lookup("triton", "mixed_sampling", "0.5.17")
    assert cap.known and "sgl-project/sglang/pull/35697" in cap.describe()


def test_the_capability_data_names_the_min_p_crash_of_deterministic_sglang():
    from pytest_miles.capabilities import load_capabilities

    caps = load_capabilities()
    for backend in ("flashinfer", "triton", "fa3"):
        cap = caps.lookup(backend, "min_p_with_seed", "0.5.17")
        assert cap.known and "sgl-project/sglang/issues/33695" in cap.describe()
    assert not caps.lookup("flashinfer", "min_p_with_seed", "0.5.24").known  # a later release must show it again


def test_min_p_is_served_by_the_reference_server_and_kept_in_its_traffic(invariant):
    from pytest_miles.checks.witness import engine_settings
    from pytest_miles.scenarios.traffic import (
        assert_min_p_served,
        assert_sampling_batch_invariant,
        limitation,
        run_traffic,
    )

    settings = engine_settings(invariant)
    assert limitation(invariant, settings, "min_p_with_seed") is None
    assert limitation(invariant, settings, "mixed_sampling") is None
    assert assert_min_p_served(invariant).passed
    assert assert_sampling_batch_invariant(invariant, trials=3).passed  # the reference samples per row
    report = run_traffic(invariant, 4, seed=2, max_prompt=8, max_new_tokens=2, spread_s=0.0, required=())
    assert report.shape["min_p"] is True and report.shape["filtered"] is False and not report.notes


def test_a_stalled_servers_log_is_shown_without_the_checks_own_polling(tmp_path):
    """On 2026-12-04 (H200) the tail of a stalled SGLang server's log was nothing but the check's own /metrics
    polls; the scheduler's lines before them are what a person needs."""
    from pytest_miles.scenarios.traffic import log_tail

    log = tmp_path / "server.log"
    sched = [f"[10:16:{i:02d}] Decode batch. #running-req: 1, #token: 319, token usage: 0.08, #queue-req: 249"
             for i in range(3)]
    noise = [f'INFO:     127.0.0.1:{40000 + i} - "GET /metrics HTTP/1.1" 200 OK' for i in range(50000)]
    log.write_text("\n".join(["started", *sched, *noise, 'INFO: 127.0.0.1:1 - "GET /health HTTP/1.1" 200']) + "\n")
    assert log_tail(str(log), 3).splitlines() == sched
    assert log_tail(str(tmp_path / "absent.log")) == "" and log_tail(None) == ""
    assert log.read_text().startswith("started")  # read, never written


BAD_WAITS = [({"stall_timeout": 0}, "stall_timeout: 0; accepted: a finite number of seconds > 0"),
             ({"stall_timeout": float("nan")}, "stall_timeout: nan"),
             ({"compile_grace": -1}, "compile_grace: -1; accepted: a finite number of seconds >= 0"),
             ({"compile_grace": "600"}, "compile_grace: '600'"),
             ({"compile_grace": True}, "compile_grace: True"),
             ({"required": ("retraction",)}, r"required: \['retraction'\] not witnesses")]


@pytest.mark.parametrize("kw, named", BAD_WAITS)
def test_a_bad_wait_or_witness_is_named_with_what_is_accepted(invariant, kw, named):
    from pytest_miles.scenarios.traffic import run_traffic

    with pytest.raises(InputError, match=named):
        run_traffic(invariant, 4, **kw)
