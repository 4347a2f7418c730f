"""The judging half of determinism under load: bitwise comparison of ids, chosen logprobs and
top-k maps, non-finite values, variance names, witnesses; and the systematic compositions."""

from __future__ import annotations

import math

import pytest

from pytest_miles.checks.compositions import boundary_lengths, composition_batches, coverage_cases
from pytest_miles.checks.traffic import (
    TrafficReport,
    compare_traffic,
    first_difference,
    judge_control,
    judge_traffic,
)
from pytest_miles.engines.base import Output
from pytest_miles.errors import InputError, NotApplicable


def _out(cached=0):
    return Output([5, 9], [-0.25, -1.5], cached, [{5: -0.25, 7: -1.0, 8: -2.0}, {9: -1.5, 3: -1.75, 2: -3.0}])


def test_same_bits_pass_and_a_one_ulp_change_in_a_non_chosen_top_k_entry_is_caught():
    assert first_difference(_out(), _out()) is None
    planted = _out()  # NEGATIVE CONTROL: a fault planted in one top-k entry that is not the chosen token
    planted.top_logprobs[1][3] = math.nextafter(-1.75, 0.0)
    assert (
        first_difference(_out(), planted)
        == f"top-k at token 1: token id 3 logprob -1.75 vs {planted.top_logprobs[1][3]!r}"
    )
    other = _out()
    other.top_logprobs[0] = {5: -0.25, 7: -1.0, 6: -2.0}
    assert "token ids [5, 7, 8] vs [5, 6, 7]" in first_difference(_out(), other)


@pytest.mark.parametrize("where", ["chosen", "top"])
def test_non_finite_values_are_a_failure_even_when_equal(where):
    bad = _out()
    if where == "chosen":
        bad.logprobs[1] = float("nan")
    else:
        bad.top_logprobs[0][8] = float("-inf")
    assert "non-finite" in first_difference(bad, bad)


def test_variances_are_named_and_witnesses_decide_applicability():
    changed = _out()
    changed.logprobs[0] = -0.5
    report = TrafficReport("e", 3, required=("retractions",), witnesses={"retractions": 0})
    compare_traffic(
        report, ["greedy"] * 3, [changed, _out(cached=4), _out()], [_out(), _out(), changed], [_out(), changed, _out()]
    )
    assert report.variances == {"batch composition": 2, "cache state": 1, "arrival order": 2}
    with pytest.raises(AssertionError, match="variance caught: batch composition"):
        judge_traffic(report)
    assert "negative control caught" in judge_control(report, False).notes[-1]
    clean = TrafficReport("e", 1, required=("retractions",), witnesses={"retractions": 0})
    with pytest.raises(NotApplicable, match="no retractions"):
        judge_traffic(clean)
    with pytest.raises(AssertionError, match="deterministic mode is ON"):
        judge_control(clean, True)
    clean.witnesses["retractions"] = 2
    assert judge_traffic(clean).passed


def test_coverage_cases_are_systematic():
    cases = coverage_cases(4)
    assert cases["singletons"] == [(0,), (1,), (2,), (3,)]
    assert len(cases["ordered_pairs"]) == 12 and (1, 0) in cases["ordered_pairs"] and (0, 1) in cases["ordered_pairs"]
    assert cases["cyclic_windows"] == [(0, 1, 2), (1, 2, 3), (2, 3, 0), (3, 0, 1)]
    assert cases["adjacent_duplicates"] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert coverage_cases(2)["cyclic_windows"] == []
    assert len(composition_batches(4)) == 4 + 12 + 4 + 4
    with pytest.raises(InputError, match="n: expected"):
        coverage_cases(0)


def test_boundary_lengths():
    assert boundary_lengths() == [1, 15, 16, 17, 63, 64, 65, 127, 128, 129]
    assert boundary_lengths(32, max_len=64) == [1, 15, 16, 17, 31, 32, 33, 63, 64]
    with pytest.raises(InputError, match="page_size"):
        boundary_lengths(0)


def test_differences_only_in_chunked_requests_are_the_known_limitation_and_any_other_fails():
    """sglang 0.5.17 (H200, 2026-12-04): under traffic only chunked requests differed on the 0.5B shape; the data
    lists it (chunked_prefill). All differences chunked: XFAIL naming the cell. One unchunked difference: FAIL,
    with the chunked ones counted apart. Without the cell (the embedded server, determinism off): FAIL."""
    from pytest_miles.capabilities import Capability, load_capabilities
    from pytest_miles.errors import KnownLimitation

    cap = load_capabilities().lookup("flashinfer", "chunked_prefill", "0.5.17", engine="sglang")
    assert cap.known and cap.cell.id == "flashinfer-chunked-prefill-under-traffic"
    assert not load_capabilities().lookup("triton", "chunked_prefill", "0.5.17", engine="sglang").known
    changed = _out()
    changed.logprobs[0] = math.nextafter(-0.25, 0.0)  # NEGATIVE CONTROL: one ulp, as measured

    def report(differing):
        r = TrafficReport("sglang", 4, required=("retractions",), witnesses={"retractions": 2}, chunked=[2, 3])
        alone = [_out() for _ in range(4)]
        first = [changed if i in differing else _out() for i in range(4)]
        return compare_traffic(r, ["greedy"] * 4, first, [_out() for _ in range(4)], alone)

    with pytest.raises(KnownLimitation) as exc:
        judge_traffic(report({3}), cap)
    assert "1 of 2 chunked requests differ; 0 of 2 unchunked" in str(exc.value)
    with pytest.raises(AssertionError, match="1 of 2 chunked requests differ; 1 of 2 unchunked") as exc:
        judge_traffic(report({1, 3}), cap)
    assert not isinstance(exc.value, KnownLimitation)
    with pytest.raises(AssertionError, match="request 3") as exc:
        judge_traffic(report({3}), Capability("promised", None, True, "reference-server"))
    assert not isinstance(exc.value, KnownLimitation) and "1 of 2 chunked requests differ" in str(exc.value)
    assert judge_traffic(report(set()), cap).passed


def _cap(backend, mode):
    from pytest_miles.capabilities import load_capabilities

    return load_capabilities().lookup(backend, mode, "0.5.17", engine="sglang")


def _traffic(diffs, *, chunked=(), retracted=None):
    """NEGATIVE CONTROL: 6 requests; `diffs` maps a request to the output position where one ulp is planted
    (position 'nan': a non-finite logprob, as a broken kernel gives)."""
    first = []
    for i in range(6):
        o = _out()
        if i in diffs:
            pos = diffs[i]
            if pos == "nan":
                o.logprobs[0] = float("nan")
            else:
                o.logprobs[pos] = math.nextafter(o.logprobs[pos], 0.0)
        o.retractions = (retracted or {}).get(i, 0)
        first.append(o)
    r = TrafficReport("sglang", 6, chunked=list(chunked))
    return compare_traffic(r, ["greedy"] * 6, first, [_out() for _ in range(6)], [_out() for _ in range(6)])


def test_a_difference_is_covered_only_by_the_limitation_that_explains_it():
    """sglang 0.5.17 (H200, 2026-12-04, 256 requests with num_retractions read per request): on triton every
    differing request was a retracted one, first differing at its 2nd-6th token; on flashinfer chunked requests,
    and on the tiny shapes a few unchunked prefills at their first token. Each is covered by its own cell; a
    difference none covers (a retracted request at its FIRST token, an unretracted one later, a non-finite value)
    fails, and the notes say which requests each cell covers."""
    from pytest_miles.checks.traffic import EXPLANATIONS, explain
    from pytest_miles.errors import KnownLimitation

    tri = [_cap("triton", m) for m in EXPLANATIONS]
    fi = [_cap("flashinfer", m) for m in EXPLANATIONS]
    assert [c.known for c in tri] == [False, True, False] and all(c.known for c in fi)
    assert tri[1].cell.id == "retracted-request-recomputed-by-prefill"
    assert fi[2].cell.id == "flashinfer-prefill-under-traffic"

    r = _traffic({1: 1, 4: 1}, retracted={1: 1, 4: 2, 5: 1})  # as on triton: retracted, from the 2nd token on
    assert r.retracted == {1: 1, 4: 2, 5: 1} and "(retracted 1x in that run)" in r.mismatches[0].detail
    assert {m.token for m in r.mismatches} == {1}
    with pytest.raises(KnownLimitation, match="retracted-request-recomputed-by-prefill") as exc:
        judge_traffic(r, *tri)
    assert "retraction: 2 of 3 retracted requests differ (1, 4)" in str(exc.value)
    assert "2 differing requests covered by a known limitation (retraction: 1, 4)" in str(exc.value)

    for case, why in (({1: 0}, "its first token: the retraction does not explain it"),
                      ({2: 1}, "not retracted"),
                      ({1: "nan"}, "non-finite")):
        r = _traffic(case, retracted={1: 1})
        with pytest.raises(AssertionError) as exc:
            judge_traffic(r, *tri)
        assert not isinstance(exc.value, KnownLimitation), why
        assert "1 differing requests no known limitation covers" in str(exc.value), why

    # flashinfer: a chunked request at any token, an unchunked prefill at its first token, a retracted one later
    r = _traffic({0: 1, 2: 0, 3: 1}, chunked=[0], retracted={3: 1})
    covered, unexplained = explain(r, dict(zip(EXPLANATIONS, fi)))
    assert covered == {"chunked_prefill": [0], "prefill_under_traffic": [2], "retraction": [3]} and not unexplained
    with pytest.raises(KnownLimitation):
        judge_traffic(r, *fi)
    r = _traffic({2: 1}, chunked=[0])  # an unchunked, unretracted request differing after its prefill: decode
    with pytest.raises(AssertionError, match="no known limitation covers: 2") as exc:
        judge_traffic(r, *fi)
    assert not isinstance(exc.value, KnownLimitation)
    # determinism off / the embedded server: no cell, every difference fails
    with pytest.raises(AssertionError) as exc:
        judge_traffic(_traffic({0: 1}, chunked=[0]))
    assert not isinstance(exc.value, KnownLimitation)


def test_difference_position_is_the_first_output_position_of_any_kind():
    from pytest_miles.checks.traffic import difference_position

    a, b = _out(), _out()
    assert difference_position(a, b) is None
    b.top_logprobs[1][2] = math.nextafter(-3.0, 0.0)  # a non-chosen top-k entry of the second token
    assert difference_position(a, b) == 1
    b.logprobs[0] = math.nextafter(-0.25, 0.0)
    assert difference_position(a, b) == 0
    assert difference_position(a, Output([5, 9, 4], a.logprobs + [-1.0], 0, a.top_logprobs)) == 2  # longer
    b.logprobs[1] = float("inf")
    assert difference_position(a, b) is None


def test_stream_merge_keeps_the_last_retraction_count():
    from pytest_miles.engines.base import stream_merge

    a = {"output_ids": [1], "meta_info": {"output_token_logprobs": [[-1.0, 1, None]], "num_retractions": 0}}
    b = {"output_ids": [2], "meta_info": {"output_token_logprobs": [[-2.0, 2, None]], "num_retractions": 1}}
    assert stream_merge(a, b)["meta_info"]["num_retractions"] == 1
