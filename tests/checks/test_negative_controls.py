"""Negative controls that prove the right variance: a control counts as caught only for batch
composition in the reference's cache state; a cold-vs-cached difference is cache state and a
deviation already at batch size 1 is arrival order, each named and leaving the control vacuous.

On the embedded reference server (a real subprocess with a prefix cache and the batch-invariance
switch): the flag-off engine is caught with 'batch composition' named; the same engine behind a
flush that does nothing (the case measured on an H200: a cold reference, then every later request
hit the prefix cache, deviating at every batch size including 1) is reported as cache state."""

from __future__ import annotations

import pytest

from pytest_miles.checks.batch_invariance import InvarianceReport, Mismatch, classify, negative_control
from pytest_miles.checks.traffic import TrafficMismatch, TrafficReport, judge_control
from pytest_miles.engines.base import Output, SamplingParams
from tests.helpers.controls import StaleCache

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


def _out(cached: int | None = 0) -> Output:
    return Output([5, 6], [-0.25, -0.5], cached_tokens=cached)


def test_classify_names_the_variance():
    assert classify(_out(0), _out(15), 1) == "cache state"
    assert classify(_out(0), _out(15), 8) == "cache state"  # another cache state: the batch is not the cause
    assert classify(_out(None), _out(0), 8) == "batch composition"  # unknown counts as no hit (flushed)
    assert classify(_out(0), _out(0), 1) == "arrival order"
    assert classify(_out(0), _out(0), 4) == "batch composition"


def _report(*mismatches: tuple[int, str], alone_matched: int = 1) -> InvarianceReport:
    r = InvarianceReport("single", "e", 4, alone_matched=alone_matched)
    r.mismatches = [Mismatch("single", bs, 0, "P", 0, 1, 1, -0.25, -0.26, v) for bs, v in mismatches]
    return r


def test_caught_only_for_batch_composition_in_the_reference_cache_state():
    caught, why = _report((2, "batch composition"), (4, "batch composition"), (3, "cache state")).batch_variance()
    assert caught and why.startswith("batch composition: 2 item(s) deviated at batch size(s) 2, 4")
    assert "1 cache-state deviation(s), not counted" in why
    caught, why = _report((1, "cache state"), (4, "cache state")).batch_variance()
    assert not caught and "2 deviation(s) are cache state" in why
    caught, why = _report((1, "arrival order"), (4, "batch composition")).batch_variance()
    assert not caught and "already at batch size 1" in why and "arrival order" in why
    caught, why = _report((4, "batch composition"), alone_matched=0).batch_variance()
    assert not caught and "no run of the prompt alone" in why
    assert _report().batch_variance() == (False, "nothing deviated")
    assert "variance: cache state (1), batch composition (1)" in _report((1, "cache state"),
                                                                         (2, "batch composition")).render()


def test_traffic_control_is_not_caught_by_cache_state_alone():
    report = TrafficReport("e", 2)
    report.mismatches = [TrafficMismatch(0, "itself alone on a flushed engine", "cache state", "d", "greedy")]
    with pytest.raises(AssertionError, match="vacuous on e: every difference is cache state"):
        judge_control(report, False)
    report.mismatches.append(TrafficMismatch(1, "a second run with another arrival order", "arrival order", "d", "t"))
    note = judge_control(report, False).notes[-1]
    assert "variance: arrival order (1); cache state (1) not counted" in note


@pytest.fixture(scope="module")
def flag_off(tmp_path_factory):
    pytest.importorskip("torch")
    from pytest_miles.engines.reference_server_engine import ReferenceServerEngine
    from pytest_miles.models.embedded import write_hf_checkpoint

    model = write_hf_checkpoint(tmp_path_factory.mktemp("tiny"))
    with ReferenceServerEngine(model, prefix_cache=True, threads=1, log_dir=tmp_path_factory.mktemp("logs")) as e:
        yield e




@pytest.mark.parametrize("mode", ["single", "needle"])
def test_flag_off_server_is_caught_for_batch_composition(flag_off, mode):
    report = negative_control(flag_off, mode, trials=4, prompt_len=16, max_batch=6, params=GREEDY)
    assert set(report.variances) == {"batch composition"}, report.render()
    assert "variance caught: batch composition" in report.notes[-1] and report.alone_matched >= 1


def test_a_control_that_differs_only_by_cache_state_is_not_caught(flag_off):
    with pytest.raises(AssertionError) as exc:
        negative_control(StaleCache(flag_off), "single", trials=4, prompt_len=16, params=GREEDY, seed=1)
    text = str(exc.value)
    assert "[single] vacuous on reference-server" in text and "not by batch composition" in text
    assert "are cache state" in text and "batch_size=1 item=0" in text and "[cache state, cached tokens 0 vs" in text
    assert "variance: cache state (" in text and "batch composition (" not in text
