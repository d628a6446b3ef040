"""Quest: per-page key min/max bounds, top pages per query head."""

from __future__ import annotations

import pytest
import torch

from longattn.hf.cache import LongattnLayer
from longattn.kernels.page_select import page_scores
from longattn.methods.decode.quest import Quest
from tests.methods.decode.helpers import assert_dense_equivalent


def test_budget_covering_everything_equals_dense():
    assert_dense_equivalent("quest", {"budget": 64, "page_size": 8, "dense_layers": 0})


def test_page_bounds_and_selection_hand_worked():
    """Pages of 2 tokens; the query points along +x. Page 1 holds the largest x key, page 3 the newest token:
    with 2 pages of budget and no sink page, Quest reads pages 1 and 3."""
    k = torch.zeros(1, 1, 7, 2)
    k[0, 0, :, 0] = torch.tensor([1.0, -1.0, 5.0, 0.0, 2.0, 0.0, 0.0])
    layer = LongattnLayer(page_size=2)
    layer.update(k, k)
    assert layer.page_min[0, 0, :, 0].tolist() == [-1.0, 0.0, 0.0, 0.0]
    assert layer.page_max[0, 0, :, 0].tolist() == [1.0, 5.0, 2.0, 0.0]
    q = torch.tensor([[[[1.0, 0.0]]]])
    assert page_scores(q, layer.page_min, layer.page_max, reduce="none")[0, 0].tolist() == [1.0, 5.0, 2.0, 0.0]
    sel = Quest(budget=4, page_size=2, dense_layers=0, sink_pages=0).select(0, q, layer).slots(layer.capacity)
    assert sel[0, 0].tolist() == [False, False, True, True, False, False, True]
    assert layer.scored_slots == 4  # the step read all 4 pages' bounds (min + max: one slot's worth each)


def test_shared_group_reads_one_page_set_per_kv_head():
    """GQA 2:1, pages of 2 tokens, 2 pages of budget, no sink page. Query head 0 points along +x (best: page 1),
    head 1 along +y (best: page 2); page 3 is the newest. Per query head each reads its own best page (the kv head
    reads 3 pages); shared, the group's best bound wins (page 1: 5 > 4) and both heads read pages 1 and 3."""
    k = torch.zeros(1, 1, 7, 2)
    k[0, 0, 2, 0] = 5.0
    k[0, 0, 4, 1] = 4.0
    layer = LongattnLayer(page_size=2)
    layer.update(k, k)
    q = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [B=1, Hq=2, 1, D=2]
    per_head = Quest(budget=4, page_size=2, dense_layers=0, sink_pages=0).select(0, q, layer).slots(layer.capacity)
    assert per_head[0, 0].tolist() == [False, False, True, True, False, False, True]
    assert per_head[0, 1].tolist() == [False, False, False, False, True, True, True]
    shared = Quest(budget=4, page_size=2, dense_layers=0, sink_pages=0, share_group=True).select(0, q, layer)
    shared = shared.slots(layer.capacity)
    assert shared.shape[1] == 1  # one set for the kv head, read by both query heads
    assert shared[0, 0].tolist() == [False, False, True, True, False, False, True]


def test_shared_group_budget_covering_everything_equals_dense():
    assert_dense_equivalent("quest", {"budget": 64, "page_size": 8, "dense_layers": 0, "share_group": True})


def test_share_group_must_be_a_bool():
    with pytest.raises(TypeError, match="share_group"):
        Quest(share_group="yes")


def _sink_layer(pages: int = 8, ps: int = 4, spread: float = 3.0, sink: float = 2.0):
    """Keys shaped like an attention-sink ("no-op") head: the first token scores highest against q = (1, 1),
    every other key scores exactly 0 but its page spans (-spread, spread) per channel, so the min/max bound of
    every ordinary page (2 * spread) exceeds the sink page's (2 * sink)."""
    k = torch.zeros(1, 1, pages * ps, 2)
    k[0, 0, 0] = sink
    k[0, 0, ps::2] = torch.tensor([spread, -spread])
    k[0, 0, ps + 1::2] = torch.tensor([-spread, spread])
    layer = LongattnLayer(page_size=ps)
    layer.update(k, k)
    return layer, k, torch.ones(1, 1, 1, 2)


def test_sink_page_is_read_where_the_bound_ranks_it_last():
    """Regression (issue 4): on the embedded model, no-op heads put ~all attention on the first token, yet the
    min/max bound ranked its page near last (498th of 500 in layer 18), so Quest read none of their attention.
    Checked against a plain PyTorch oracle: the page holding the highest q·k is read."""
    layer, k, q = _sink_layer()
    scores = (q[0, 0] @ k[0, 0].T)[0]  # exhaustive q·k
    best_page = int(scores.argmax()) // 4
    assert best_page == 0 and torch.softmax(scores / 2 ** 0.5, -1)[0] > 0.2
    bounds = page_scores(q, layer.page_min, layer.page_max, reduce="none")[0, 0]
    assert (bounds >= scores.view(-1, 4).amax(1) - 1e-6).all()  # a valid bound, but a loose one
    assert int((bounds > bounds[0]).sum()) == 7  # the sink's page is ranked below every ordinary page
    paper = Quest(budget=12, page_size=4, dense_layers=0, sink_pages=0).select(0, q, layer).slots(layer.capacity)
    assert not paper[0, 0, :4].any()  # the bound alone misses the sink
    sel = Quest(budget=12, page_size=4, dense_layers=0).select(0, q, layer).slots(layer.capacity)
    assert sel[0, 0, best_page * 4:best_page * 4 + 4].all()
    assert int(sel[0, 0].sum()) == 12  # the sink page counts against the budget: still 3 pages read


def test_sink_pages_must_leave_room_for_the_newest_page():
    with pytest.raises(ValueError, match="sink_pages: 4 sink pages and the newest page exceed"):
        Quest(budget=64, page_size=16, sink_pages=4)
    with pytest.raises(ValueError, match="sink_pages: expected an int >= 0"):
        Quest(sink_pages=-1)


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
