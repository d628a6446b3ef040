"""H2O: heavy hitters by accumulated attention + recent tokens."""

from __future__ import annotations

import math

import torch

from longattn.hf.cache import LongattnLayer
from longattn.methods.decode.h2o import H2O, accumulated_attention
from tests.methods.decode.helpers import assert_dense_equivalent


def test_budget_covering_everything_equals_dense():
    assert_dense_equivalent("h2o", {"budget": 60})


def test_accumulated_attention_equals_a_loop():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 9, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    want = torch.zeros(1, 2, 9)
    for h in range(4):
        for i in range(9):
            p = torch.softmax(q[0, h, i] @ k[0, h // 2, : i + 1].T / math.sqrt(8), -1)
            want[0, h // 2, : i + 1] += p
    assert torch.allclose(accumulated_attention(k, q, chunk=4), want, atol=1e-5)


def test_kept_set_hand_worked():
    """Every query looks along x; token 2's key is the largest along x, token 4's next: from position 2 on,
    token 2 takes nearly all attention, so it is the heavy hitter; token 0 gets the early queries' mass
    (1 + 1/2 + ...), more than token 4. Budget 4 = 2 heavy + 2 recent."""
    k = torch.zeros(1, 1, 8, 2)
    k[0, 0, 2, 0], k[0, 0, 4, 0] = 10.0, 5.0
    q = torch.zeros(1, 1, 8, 2)
    q[..., 0] = 1.0
    layer = LongattnLayer()
    layer.update(k, k)
    layer.queries = q
    H2O(budget=4).apply_compress(0, layer)
    assert layer.kept_positions() == [0, 2, 6, 7]
    scores = layer.slot_state["h2o"][0, 0]
    assert scores[1] > 4.0 and scores[0] > scores[2] + scores[3]  # token 2 (slot 1) is the heavy hitter


def test_decode_keeps_the_budget():
    policy = H2O(budget=4)
    layer = LongattnLayer()
    k = torch.randn(1, 1, 6, 2)
    layer.update(k, k)
    layer.queries = torch.randn(1, 1, 6, 2)
    policy.apply_compress(0, layer)
    for _ in range(3):
        layer.update(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2))
        policy.after_step(0, torch.randn(1, 1, 1, 2), layer)
        assert int(layer.lengths.max()) == 4 and layer.kept_positions()[-2:] == [layer.seen - 2, layer.seen - 1]
