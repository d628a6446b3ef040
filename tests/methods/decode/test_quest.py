"""Quest: per-page key min/max bounds, top pages per query head."""

from __future__ import annotations

import pytest
import torch

from longattn.hf.cache import LongattnLayer
from longattn.methods.decode.quest import Quest, page_upper_bounds
from tests.methods.decode.helpers import assert_dense_equivalent


def test_budget_covering_everything_equals_dense():
    assert_dense_equivalent("quest", {"budget": 64, "page_size": 8, "dense_layers": 0})


def test_page_bounds_and_selection_hand_worked():
    """Pages of 2 tokens; the query points along +x. Page 1 holds the largest x key, page 3 the newest token:
    with 2 pages of budget, Quest reads pages 1 and 3."""
    k = torch.zeros(1, 1, 7, 2)
    k[0, 0, :, 0] = torch.tensor([1.0, -1.0, 5.0, 0.0, 2.0, 0.0, 0.0])
    layer = LongattnLayer(page_size=2)
    layer.update(k, k)
    assert layer.page_min[0, 0, :, 0].tolist() == [-1.0, 0.0, 0.0, 0.0]
    assert layer.page_max[0, 0, :, 0].tolist() == [1.0, 5.0, 2.0, 0.0]
    q = torch.tensor([[[[1.0, 0.0]]]])
    assert page_upper_bounds(q, layer.page_min, layer.page_max)[0, 0].tolist() == [1.0, 5.0, 2.0, 0.0]
    sel = Quest(budget=4, page_size=2, dense_layers=0).select(0, q, layer)
    assert sel[0, 0].tolist() == [False, False, True, True, False, False, True]


def test_bounds_track_appends_and_eviction():
    g = torch.Generator().manual_seed(0)
    layer = LongattnLayer(page_size=4)
    k = torch.randn(2, 3, 11, 8, generator=g)
    layer.update(k[:, :, :9], k[:, :, :9])
    layer.update(k[:, :, 9:], k[:, :, 9:])
    keep = torch.rand(2, 3, layer.capacity, generator=g) > 0.4
    layer.evict(keep)
    for b in range(2):
        for h in range(3):
            kept = k[b, h, layer.kept_positions(b, h)]
            for p in range(0, kept.shape[0], 4):
                assert torch.equal(layer.page_min[b, h, p // 4], kept[p:p + 4].amin(0))
                assert torch.equal(layer.page_max[b, h, p // 4], kept[p:p + 4].amax(0))


def test_page_size_must_divide_the_budget():
    with pytest.raises(ValueError, match="page_size: 16 does not divide budget=100"):
        Quest(budget=100, page_size=16)
