"""DELTA: full layers, Δ-layers that pick pages from attention over all heads, sparse layers that reuse them."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.hf.cache import LongattnLayer
from longattn.hf.compat import cache_kwargs
from longattn.methods.decode.delta import DELTA
from tests.methods.decode.helpers import (
    assert_dense_equivalent,
    assert_listed,
    assert_padded_dense_equivalent,
    greedy,
    prompt,
    tiny_llama,
)


def test_budget_covering_everything_equals_dense():
    config = {"budget": 64, "full_layers": 1, "delta_layers": (1,), "page_size": 4, "sinks": 4, "recent": 8}
    assert_dense_equivalent("delta", config, layers=3)
    assert_padded_dense_equivalent("delta", config, layers=3)


def _layer(hot: int, S: int = 10) -> LongattnLayer:
    """Two kv heads; head 0 has one key pointing along the query at ``hot``, head 1 has all-zero keys."""
    k = torch.zeros(1, 2, S, 2)
    k[0, 0, hot, 0] = 12.0
    layer = LongattnLayer()
    layer.update(k, k)
    return layer


def test_three_groups_hand_worked():
    """Pages of 2, 1 sink, 2 recent, budget 5 = sink + recent + one page. Layer 0 is full, layer 1 a Δ-layer whose
    head 0 points at token 5 (page 2 = slots 4, 5), layer 2 sparse (reuses it), layer 3 a Δ-layer pointing at
    token 2 (page 1), layer 4 sparse again."""
    policy = DELTA(budget=5, full_layers=1, delta_layers=(1, 3), page_size=2, sinks=1, recent=2)
    policy.num_layers = 5
    layers = [_layer(5), _layer(5), _layer(7), _layer(2), _layer(7)]
    q = torch.tensor([[[[1.0, 0.0]]] * 2])  # [B=1, Hq=2, 1, D=2]
    assert [policy.group(i) for i in range(5)] == ["full", "delta", "sparse", "delta", "sparse"]
    assert policy.select(0, q, layers[0]) is None
    assert policy.select(1, q, layers[1]) is None
    assert policy.select(2, q, layers[2])[0, 0].nonzero().flatten().tolist() == [0, 4, 5, 8, 9]
    assert policy.select(3, q, layers[3]) is None
    assert policy.select(4, q, layers[4])[0, 0].nonzero().flatten().tolist() == [0, 2, 3, 8, 9]


def test_unified_selection_sums_every_head():
    """Head 0 splits its attention over tokens 2 and 4, head 1 puts it all on token 4: page 2 wins for both."""
    k = torch.zeros(1, 2, 8, 2)
    k[0, 0, 2, 0] = k[0, 0, 4, 0] = 12.0
    k[0, 1, 4, 0] = 12.0
    layer = LongattnLayer()
    layer.update(k, k)
    policy = DELTA(budget=4, full_layers=0, delta_layers=(0,), page_size=2, sinks=0, recent=2)
    chosen = policy.choose(torch.tensor([[[[1.0, 0.0]]] * 2]), layer)
    assert chosen.shape == (1, 1, 8) and chosen[0, 0].nonzero().flatten().tolist() == [4, 5, 6, 7]


def test_sparse_generation_runs_and_reads_fewer_tokens():
    model = tiny_llama(3)
    config = {"budget": 16, "full_layers": 1, "delta_layers": (1,), "page_size": 4, "sinks": 2, "recent": 6}
    handle = longattn.patch(model, decode="delta", impl="reference", decode_config=config)
    try:
        cache = handle.cache()
        greedy(model, prompt(40), new=4, **cache_kwargs(model, cache))
        chosen = handle.state.policy._chosen[1]
        assert int(chosen.sum()) == 16 and int(cache.layers[2].lengths.max()) == 43  # nothing evicted
    finally:
        handle.restore()


def test_errors():
    with pytest.raises(ValueError, match="budget: expected an int >= 1, got 0"):
        DELTA(budget=0)
    with pytest.raises(ValueError, match="page_size: 16 does not divide budget - sinks - recent = 56"):
        DELTA(budget=200)
    with pytest.raises(ValueError, match="budget: 32 leaves no page after sinks=16 \\+ recent=128"):
        DELTA(budget=32)
    with pytest.raises(ValueError, match="delta_layers: expected increasing"):
        DELTA(delta_layers=(5, 3))
    with pytest.raises(ValueError, match="delta_layers: the first Δ-layer \\(1\\) must come at or after"):
        DELTA(delta_layers=(1,), full_layers=2)
    with pytest.raises(TypeError, match="page_size: expected an int"):
        DELTA(page_size=2.5)
    with pytest.raises(ValueError, match="delta_layers: \\(2, 9\\) lie beyond the model's 2 layers"):
        longattn.patch(tiny_llama(), decode="delta", decode_config={"delta_layers": (2, 9)})


def test_listed(capsys):
    assert_listed("delta", "DELTA: Dynamic Layer-Aware", capsys)
