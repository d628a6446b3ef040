"""SnapKV: the observation window's pooled votes choose the prefix tokens to keep."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.hf.cache import LongattnLayer
from longattn.hf.compat import cache_kwargs
from longattn.methods.decode.base import pool1d, window_votes
from longattn.methods.decode.snapkv import SnapKV
from tests.methods.decode.helpers import assert_dense_equivalent, greedy, prompt, tiny_llama


def test_budget_equal_to_context_equals_dense():
    assert_dense_equivalent("snapkv", {"budget": 40, "window": 8})


def test_kept_set_hand_worked():
    """Window queries point at tokens 1 and 3 (large keys along their direction); budget 4 = 2 votes + window 2."""
    k = torch.zeros(1, 1, 8, 2)
    k[0, 0, 1] = torch.tensor([10.0, 0.0])
    k[0, 0, 3] = torch.tensor([0.0, 10.0])
    q = torch.ones(1, 2, 2, 2)  # two query heads share the kv head (GQA 2)
    layer = LongattnLayer()
    layer.update(k, k)
    layer.queries = q
    SnapKV(budget=4, window=2, kernel=1).apply_compress(0, layer)
    assert layer.kept_positions() == [1, 3, 6, 7]


def test_window_votes_and_pooling_hand_worked():
    k = torch.zeros(1, 1, 3, 1)
    votes = window_votes(k, torch.zeros(1, 1, 2, 1))  # uniform: query at pos 1 -> 1/2, 1/2; at pos 2 -> 1/3 each
    assert torch.allclose(votes, torch.tensor([[[1 / 2 + 1 / 3, 1 / 2 + 1 / 3, 1 / 3]]]))
    x = torch.tensor([[[0.0, 1.0, 0.0, 0.0, 3.0, 0.0]]])
    assert pool1d(x, 3, "max").tolist() == [[[1.0, 1.0, 1.0, 3.0, 3.0, 3.0]]]
    assert torch.allclose(pool1d(x, 3, "avg"), torch.tensor([[[0.5, 1 / 3, 1 / 3, 1.0, 1.0, 1.5]]]))


def test_compressed_generation_runs_and_holds_the_budget():
    model = tiny_llama()
    handle = longattn.patch(model, decode="snapkv", impl="reference", decode_config={"budget": 16, "window": 4})
    try:
        cache = handle.cache()
        greedy(model, prompt(40), new=5, **cache_kwargs(model, cache))
        assert all(int(layer.lengths.max()) == 16 + 4 for layer in cache.layers)  # 16 kept + 4 decoded
    finally:
        handle.restore()


def test_errors():
    with pytest.raises(ValueError, match="budget: expected an int >= 1, got -3"):
        SnapKV(budget=-3)
    with pytest.raises(ValueError, match="budget: 8 is smaller than the observation window"):
        SnapKV(budget=8, window=32)
    with pytest.raises(ValueError, match="kernel: the pooling kernel must be odd"):
        SnapKV(kernel=4)
    model = tiny_llama()
    with longattn.patch(model, decode="snapkv", decode_config={"budget": 64, "window": 8}), pytest.raises(
            ValueError, match=r"budget: 64 tokens per head exceeds the context \(40 tokens\)"):
        greedy(model, prompt(40), new=2)
