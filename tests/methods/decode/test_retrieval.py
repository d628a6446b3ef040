"""RetrievalAttention: sinks + recent window always read, the middle keys searched in a faiss index per step."""

from __future__ import annotations

import sys

import pytest
import torch

import longattn
from longattn.hf.cache import LongattnLayer
from longattn.hf.compat import cache_kwargs
from longattn.methods.decode.retrieval import RetrievalAttention
from tests.methods.decode.helpers import (
    assert_dense_equivalent,
    assert_listed,
    assert_padded_dense_equivalent,
    greedy,
    prompt,
    tiny_llama,
)

pytest.importorskip("faiss", reason="the 'ann' extra (faiss-cpu) is part of the dev install")


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_budget_covering_everything_equals_dense(index):
    """top_k >= the indexed middle: every token is read."""
    config = {"n_sink": 4, "n_recent": 8, "top_k": 64, "index": index, "ef_search": 64}
    assert_dense_equivalent("retrieval", config)
    assert_padded_dense_equivalent("retrieval", config)


def test_retrieval_hand_worked():
    """2 sinks, 3 recent, top-2, exact index: 12 tokens, slots 2-8 indexed. Query head 0 (along x) retrieves the
    two largest x keys (slots 5, 7), query head 1 (along y) slots 3 and 4; GQA 2 reads their union. One decoded
    token later, slot 9 has left the recent window and joined the index, and head 0's best is now slot 9."""
    k = torch.zeros(1, 1, 12, 2)
    k[0, 0, :, 0] = torch.tensor([9.0, 9.0, 0.0, 1.0, 2.0, 8.0, 0.0, 7.0, 3.0, 9.0, 0.0, 0.0])
    k[0, 0, :, 1] = torch.tensor([0.0, 0.0, 1.0, 6.0, 5.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    layer = LongattnLayer()
    layer.update(k, k)
    policy = RetrievalAttention(n_sink=2, n_recent=3, top_k=2, index="flat")
    policy.apply_compress(0, layer)
    assert layer.retrieval["hi"] == 9 and layer.retrieval["indexes"][0][0].ntotal == 7
    q = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    assert policy.select(0, q, layer)[0, 0].nonzero().flatten().tolist() == [0, 1, 3, 4, 5, 7, 9, 10, 11]
    layer.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    sel = policy.select(0, q, layer)
    assert layer.retrieval["hi"] == 10 and sel[0, 0].nonzero().flatten().tolist() == [0, 1, 3, 4, 5, 9, 10, 11, 12]


def test_hnsw_generation_reads_static_plus_retrieved():
    model = tiny_llama()
    config = {"n_sink": 2, "n_recent": 6, "top_k": 4, "ef_search": 16}
    handle = longattn.patch(model, decode="retrieval", impl="reference", decode_config=config)
    try:
        cache = handle.cache()
        greedy(model, prompt(40), new=4, **cache_kwargs(model, cache))
        layer = cache.layers[0]
        assert layer.retrieval["hi"] == 43 - 6 and layer.retrieval["indexes"][0][1].ntotal == 35
        sel = handle.state.policy.select(0, torch.randn(1, 4, 1, 16), layer)
        n = sel.sum(-1)
        assert bool(((n >= 2 + 6 + 4) & (n <= 2 + 6 + 8)).all()), n  # static + top-4 per query head, GQA 2
    finally:
        handle.restore()


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r"install the 'ann' extra: pip install 'longattn\[ann\]'"):
        RetrievalAttention()


def test_errors():
    with pytest.raises(ValueError, match="top_k: expected an int >= 1, got 0"):
        RetrievalAttention(top_k=0)
    with pytest.raises(ValueError, match="ef_search: 50 candidates cannot return top_k=100"):
        RetrievalAttention(ef_search=50)
    with pytest.raises(ValueError, match="index: expected one of"):
        RetrievalAttention(index="ivf")
    with pytest.raises(ValueError, match="n_recent: expected an int >= 1, got 0"):
        RetrievalAttention(n_recent=0)


def test_listed(capsys):
    assert_listed("retrieval", "RetrievalAttention", capsys)
