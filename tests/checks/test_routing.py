"""Routing records compared: the same tokens through the same MoE model route alike, a planted
router perturbation (one expert's logit nudged at one token in one layer) is found at that token
and layer, and a tie in router scores is reported as a tie."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pytest_miles import RoutingRecord, assert_routing_equal, compare_routing, first_routing_difference  # noqa: E402
from pytest_miles.engines.reference import ReferenceEngine  # noqa: E402
from pytest_miles.errors import InputError  # noqa: E402
from pytest_miles.models.moe import MOE_SHAPES  # noqa: E402

TOKENS = [5, 17, 99, 3, 250, 41, 7, 300, 12, 64]


@pytest.fixture(scope="module")
def engine():
    with ReferenceEngine(config=MOE_SHAPES["tiny-moe"], deterministic=True) as e:
        yield e


def test_the_same_tokens_route_alike_twice(engine):
    a, b = engine.routing(TOKENS), engine.routing(TOKENS)
    report = assert_routing_equal(a, b)
    assert report.passed and (report.tokens, report.layers) == (len(TOKENS), 2)
    assert first_routing_difference(a, b) is None


def test_batched_prefill_routes_like_token_by_token(engine):
    """Routing is a top-k over fp32 logits: the batched engine's last-bit differences move no expert here."""
    with ReferenceEngine(config=MOE_SHAPES["tiny-moe"]) as batched:
        assert_routing_equal(engine.routing(TOKENS), batched.routing(TOKENS))


def test_a_planted_router_perturbation_is_found_at_its_token_and_layer(engine):
    base = engine.routing(TOKENS)
    token, layer = 6, 1
    outsider = min(set(range(8)) - set(base.experts[token][layer]))

    def nudge(n, positions, logits):
        if n != layer:
            return None
        logits = logits.clone()
        at = positions == token
        logits[at, outsider] = logits[at].max(-1).values + 1.0  # just above the best: now in the top-2
        return logits

    planted = engine.routing(TOKENS, router_hooks=(nudge,))
    first = first_routing_difference(base, planted)
    assert (first.token, first.layer) == (token, layer) and first.only_b == (outsider,) and not first.tie
    with pytest.raises(AssertionError) as exc:
        assert_routing_equal(base, planted)
    assert f"first difference: token {token}, layer {layer}" in str(exc.value)
    assert f"vs {outsider})" in str(exc.value)


def _record(source, experts, scores=None):
    return RoutingRecord(source=source, experts=((tuple(experts),),),
                         scores=None if scores is None else ((tuple(scores),),))


def test_a_tie_in_router_scores_is_reported_as_a_tie():
    scores = (0.4, 0.2, 0.2, 0.1, 0.1)  # experts 1 and 2 score equal: top-2 may take either
    a, b = _record("rollout", (0, 1), scores), _record("trainer", (0, 2), scores)
    report = compare_routing(a, b)
    assert report.first.tie and report.ties == 1
    assert "TIE in router scores" in report.render() and "expert 1 (chosen) and expert 2 (left out) equal" \
        in report.render()
    untied = compare_routing(_record("rollout", (0, 1), (0.4, 0.3, 0.2, 0.05, 0.05)), _record("trainer", (0, 2)))
    assert not untied.first.tie and "TIE" not in untied.render()


def test_records_that_cannot_be_compared_are_refused_by_name():
    with pytest.raises(InputError, match="different shapes"):
        compare_routing(_record("a", (0, 1)), RoutingRecord("b", ((( 0, 1),), ((0, 1),))))
    with pytest.raises(InputError, match="expected a RoutingRecord"):
        compare_routing({"experts": []}, _record("b", (0, 1)))
    with pytest.raises(InputError, match="different token ids"):
        compare_routing(RoutingRecord("a", (((0, 1),),), tokens=(4,)), RoutingRecord("b", (((0, 1),),), tokens=(5,)))
    with pytest.raises(AssertionError, match="vacuous"):
        assert_routing_equal(RoutingRecord("a", ()), RoutingRecord("b", ()))


def test_a_record_survives_json():
    rec = _record("x", (1, 3), (0.1, 0.5, 0.0, 0.4))
    assert RoutingRecord.from_json(rec.to_json()) == rec
