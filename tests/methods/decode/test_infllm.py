"""InfLLM: sinks + local window, memory units looked up by their representative tokens."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.hf.cache import LongattnLayer
from longattn.hf.compat import cache_kwargs
from longattn.methods.decode.infllm import InfLLM
from tests.methods.decode.helpers import (
    assert_dense_equivalent,
    assert_listed,
    assert_padded_dense_equivalent,
    greedy,
    prompt,
    tiny_llama,
)


def test_budget_covering_everything_equals_dense():
    """16 units of 4 cover the 60 tokens: every memory unit is read."""
    assert_dense_equivalent("infllm", {"n_init": 4, "n_local": 8, "block_size": 4, "repr_topk": 2, "topk": 16})
    assert_padded_dense_equivalent("infllm", {"n_init": 4, "n_local": 8, "block_size": 4, "repr_topk": 2, "topk": 16})


def test_representatives_are_voted_by_their_own_unit_causally():
    """One sink, units of 3: unit 0 = positions 1-3. Queries (D=1) [_, 9, 0, 0] and keys [_, 1, 2, 3]: key 1 is
    seen by queries 1, 2, 3 (mean 9 * 1 / 3 = 3), keys 2 and 3 only by zero queries, so key 1 represents the
    unit although q1 · k3 would be the largest product without causality. Position 4 opens unit 1."""
    k = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0]).view(1, 1, 5, 1)
    q = torch.tensor([7.0, 9.0, 0.0, 0.0, 1.0]).view(1, 1, 5, 1)
    layer = LongattnLayer()
    layer.update(k, k)
    policy = InfLLM(n_init=1, n_local=1, block_size=3, repr_topk=1, topk=1)
    policy.accumulate(layer, q, 0)
    r = layer.slot_state["infllm_rsum"] / layer.slot_state["infllm_rcnt"].clamp(min=1)
    assert r[0, 0].tolist() == [0.0, 3.0, 0.0, 0.0, 5.0]  # the sink is never scored
    assert policy.representatives(layer, 1)[0, 0].tolist() == [[1]]


def test_lookup_hand_worked():
    """1 sink, local window 4, units of 3, one representative, top-1 unit. 14 tokens: memory units [1, 4), [4, 7),
    [7, 10); local = 10-13. Unit 1's representative (slot 4) points along the query: read {0, 4, 5, 6, 10..13}."""
    k = torch.zeros(1, 1, 14, 2)
    k[0, 0, :, 1] = 1.0
    k[0, 0, 4] = torch.tensor([6.0, 0.0])
    k[0, 0, 8] = torch.tensor([-6.0, 0.0])
    layer = LongattnLayer()
    layer.update(k, k)
    layer.compressed = True
    policy = InfLLM(n_init=1, n_local=4, block_size=3, repr_topk=1, topk=1)
    rsum = layer.add_slot_state("infllm_rsum")
    rsum[0, 0, [2, 4, 8]] = 1.0  # representatives: slot 2, 4, 8
    assert policy.memory_units(14) == 3
    sel = policy.select(0, torch.tensor([[[[1.0, 0.0]]]]), layer)
    assert sel[0, 0].nonzero().flatten().tolist() == [0, 4, 5, 6, 10, 11, 12, 13]
    assert layer.scored_slots == 1.5  # 3 representative keys read to choose: half a slot each


def test_generation_reads_sinks_local_and_top_units():
    model = tiny_llama()
    config = {"n_init": 2, "n_local": 8, "block_size": 4, "repr_topk": 2, "topk": 2}
    handle = longattn.patch(model, decode="infllm", impl="reference", decode_config=config)
    try:
        cache = handle.cache()
        greedy(model, prompt(40), new=4, **cache_kwargs(model, cache))
        layer = cache.layers[1]
        assert layer.queries is None and int(layer.lengths.max()) == 43  # nothing evicted, queries freed
        q = torch.randn(1, 4, 1, 16)
        sel = handle.state.policy.select(1, q, layer)  # 43 tokens: 8 memory units (2..33), local 34..42
        assert sel.sum(-1).tolist() == [[2 + 2 * 4 + 9] * 2]
    finally:
        handle.restore()


def test_question_agnostic_needs_compress():
    model = tiny_llama()
    handle = longattn.patch(model, decode="infllm", impl="reference",
                            decode_config={"n_init": 2, "n_local": 8, "block_size": 4, "topk": 1})
    try:
        cache = handle.cache(auto_compress=False)
        with torch.no_grad():
            model(prompt(40), **cache_kwargs(model, cache))
        with pytest.raises(ValueError, match="infllm: the representative tokens are scored at compress"):
            greedy(model, prompt(41), new=2, **cache_kwargs(model, cache))
    finally:
        handle.restore()


def test_errors():
    with pytest.raises(ValueError, match="topk: expected an int >= 1, got 0"):
        InfLLM(topk=0)
    with pytest.raises(ValueError, match="repr_topk: 8 representative tokens do not fit in a memory unit of "
                                         "block_size=4"):
        InfLLM(block_size=4, repr_topk=8)
    with pytest.raises(ValueError, match="block_size: expected an int >= 1, got -1"):
        InfLLM(block_size=-1)
    with pytest.raises(TypeError, match="n_local: expected an int"):
        InfLLM(n_local="4k")


def test_listed(capsys):
    assert_listed("infllm", "InfLLM", capsys)
