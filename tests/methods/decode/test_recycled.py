"""Recycled Attention: a full step every ``stride``, the recycled top tokens in between."""

from __future__ import annotations

import torch

from longattn.hf.cache import LongattnLayer
from longattn.methods.decode.recycled import RecycledAttention
from tests.methods.decode.helpers import assert_dense_equivalent


def test_budget_covering_everything_equals_dense():
    assert_dense_equivalent("recycled", {"budget": 64, "stride": 3})


def test_schedule_hand_worked():
    """As in generation: each step's token is stored before its query selects; storage has spare room after the
    first decoding append, so "generated since the full step" must be told by slot count, not by capacity."""
    k = torch.zeros(1, 1, 5, 2)
    k[0, 0, 3, 0] = 9.0
    layer = LongattnLayer()
    layer.update(k, k)
    policy = RecycledAttention(budget=1, stride=2)
    q = torch.tensor([[[[1.0, 0.0]]]])
    step_token = torch.zeros(1, 1, 1, 2)
    layer.update(step_token, step_token)  # token 5
    assert layer.capacity > 6  # spare room from here on
    assert policy.select(0, q, layer) is None  # step 0: full attention, token 3 recycled
    layer.update(step_token, step_token)  # token 6
    sel = policy.select(0, q, layer)  # step 1: token 3 + the tokens of steps 0 and 1
    assert sel[0, 0].tolist() == [False] * 3 + [True, False, True, True] + [False] * (layer.capacity - 7)
    layer.update(step_token, step_token)
    assert policy.select(0, q, layer) is None  # step 2: full again
