"""TokenSelect: per-head soft voting, selection reused while queries stay similar."""

from __future__ import annotations

import torch

from longattn.hf.cache import LongattnLayer
from longattn.methods.decode.tokenselect import TokenSelect
from tests.methods.decode.helpers import assert_dense_equivalent


def test_budget_covering_everything_equals_dense():
    assert_dense_equivalent("tokenselect", {"budget": 64})


def test_votes_and_reuse_hand_worked():
    """Head 0 looks along x (token 1 wins), head 1 along y (token 4 wins): the two soft votes pick {1, 4}. A
    similar next query reuses the selection (plus the new token); an orthogonal one reselects."""
    k = torch.zeros(1, 1, 6, 2)
    k[0, 0, 1, 0], k[0, 0, 4, 1] = 8.0, 8.0
    layer = LongattnLayer()
    layer.update(k, k)
    policy = TokenSelect(budget=2, threshold=0.9)
    q = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [B=1, Hq=2, 1, D=2]
    assert policy.select(0, q, layer)[0, 0].nonzero().flatten().tolist() == [1, 4]
    assert layer.scored_slots == layer.capacity / 2  # the vote read every key (half a slot each)
    layer.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    before = layer.scored_slots
    assert policy.select(0, q * 1.01, layer)[0, 0].nonzero().flatten().tolist() == [1, 4, 6]
    assert layer.scored_slots == before  # a reused selection reads nothing to choose
    k2 = layer.keys.clone()
    k2[0, 0, 2] = torch.tensor([-9.0, 9.0])
    layer.keys = k2
    turned = torch.tensor([[[[-1.0, 1.0]], [[-1.0, 1.0]]]])
    assert policy.select(0, turned, layer)[0, 0].nonzero().flatten().tolist()[0] == 2
