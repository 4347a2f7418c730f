"""What a routing replay accepts (models.routing.replay_experts, the check every trainer session's
replay goes through before the ranks see it): one record per sample, the model's layer count, top-k
distinct expert ids in range, every token of the sample or all but its last."""

from __future__ import annotations

import pytest

from pytest_miles.errors import InputError
from pytest_miles.models.routing import RoutingRecord, replay_experts

SAMPLES = [{"tokens": [5, 6, 7], "prompt_len": 1}]


def record(experts, tokens=(5, 6, 7)):
    return RoutingRecord("rollout", tuple(tuple(tuple(e) for e in row) for row in experts), tokens=tokens)


def test_a_good_record_is_the_replay_and_all_but_the_last_token_is_accepted():
    good = record([[(0, 1), (2, 3)]] * 3)
    assert replay_experts([good], SAMPLES, 2, 8, 2) == [[[[0, 1], [2, 3]]] * 3]
    short = record([[(0, 1), (2, 3)]] * 2, tokens=(5, 6))
    assert len(replay_experts([short], SAMPLES, 2, 8, 2)[0]) == 2


@pytest.mark.parametrize("records, match", [
    ([], r"0 records for 1 samples; expected a list of one RoutingRecord per sample"),
    ([{"experts": []}], r"dict is not accepted; expected a RoutingRecord"),
    ([record([[(0, 1), (2, 3)]])], r"holds 1 tokens; the sample has 3, and 3 or 2 .all but the last. are accepted"),
    ([record([[(0, 1)]] * 3)], r"token 0: 1 layers; the model has 2 MoE layers and exactly that many are accepted"),
    ([record([[(0, 1), (2, 8)]] * 3)], r"token 0, layer 1: experts \[2, 8\]; accepted: 2 distinct expert ids in 0..7"),
    ([record([[(0, 0), (2, 3)]] * 3)], r"layer 0: experts \[0, 0\]; accepted: 2 distinct"),
    ([record([[(0, 1, 2), (2, 3)]] * 3)], r"\[0, 1, 2\]; accepted: 2 distinct expert ids in 0..7 .top-2 of 8 experts"),
    ([record([[(0, 1), (2, 3)]] * 3, tokens=(5, 9, 7))], r"other token ids than the sample's"),
])
def test_a_wrong_replay_is_refused_naming_what_and_what_is_accepted(records, match):
    with pytest.raises(InputError, match=match):
        replay_experts(records, SAMPLES, 2, 8, 2)
