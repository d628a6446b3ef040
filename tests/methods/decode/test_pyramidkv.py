"""PyramidKV: SnapKV selection with linearly shrinking per-layer budgets."""

from __future__ import annotations

import torch

from longattn.hf.cache import LongattnLayer
from longattn.methods.decode.pyramidkv import PyramidKV
from tests.methods.decode.helpers import assert_dense_equivalent


def test_budget_equal_to_context_equals_dense():
    assert_dense_equivalent("pyramidkv", {"budget": 40, "window": 8})


def test_layer_budgets_hand_worked():
    """budget 100, beta 20, 5 layers: last = 100/20 = 5, first = 2*100 - 5 = 195, linear in between."""
    p = PyramidKV(budget=100, window=4, beta=20)
    p.num_layers = 5
    budgets = [p.layer_budget(i) for i in range(5)]
    assert budgets == [195, 148, 100, 52, 5]


def test_deep_layer_keeps_fewer():
    p = PyramidKV(budget=8, window=2, kernel=1, beta=4)
    p.num_layers = 3
    k = torch.randn(1, 1, 20, 4, generator=torch.Generator().manual_seed(0))
    kept = []
    for layer_idx in range(3):
        layer = LongattnLayer()
        layer.update(k, k)
        layer.queries = torch.randn(1, 1, 2, 4)
        p.apply_compress(layer_idx, layer)
        kept.append(int(layer.lengths.max()))
    assert kept == [14, 8, 2]
