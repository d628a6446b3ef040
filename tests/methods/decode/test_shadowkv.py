"""ShadowKV: low-rank (post-RoPE, see the module docstring) prompt keys, values in CPU memory, landmark chunks,
exact outliers, sparse rebuild of the selected keys."""

from __future__ import annotations

import copy

import pytest
import torch

import longattn
from longattn.hf.cache import attend_cached
from longattn.hf.compat import cache_kwargs
from longattn.kernels.reference import reference_attention
from longattn.masks.core import MaskMod
from longattn.methods.decode.shadowkv import ShadowKV, ShadowLayer
from tests.methods.decode.helpers import (
    assert_dense_equivalent,
    assert_listed,
    assert_padded_dense_equivalent,
    greedy,
    prompt,
    tiny_llama,
)
from tests.oracle import assert_close_to_reference


def test_budget_covering_everything_equals_dense():
    assert_dense_equivalent("shadowkv", {"budget": 64, "chunk_size": 8, "rank": 16, "outlier_chunk": 1,
                                         "local_chunk": 1})
    assert_padded_dense_equivalent("shadowkv", {"budget": 64, "chunk_size": 8, "rank": 16})


def test_full_rank_reading_every_chunk_matches_dense_logits():
    """Rank = the key width (2 kv heads x 16), a budget of 7 chunks + 1 outlier = all 8 chunks of the 32-token
    factorised prefix: the rebuilt read is dense attention
    up to the SVD's rounding, so the decoding logits (teacher-forced on the dense tokens) match the unpatched model's
    as closely as plain fp32 matches fp64. (Greedy tokens can still flip on a near-tie, so logits are compared.)"""
    config = {"budget": 28, "chunk_size": 4, "rank": 32, "outlier_chunk": 1, "local_chunk": 2}
    model = tiny_llama()
    ids = greedy(model, prompt(40), new=6)
    with torch.no_grad():
        dense = model(ids).logits[:, 40:]
        ref = copy.deepcopy(model).double()(ids).logits[:, 40:]
    handle = longattn.patch(model, decode="shadowkv", impl="reference", decode_config=config)
    try:
        cache = handle.cache()
        with torch.no_grad():
            model(ids[:, :40], **cache_kwargs(model, cache))
            ours = torch.cat([model(ids[:, i:i + 1], **cache_kwargs(model, cache)).logits for i in range(40, 46)], 1)
        assert all(layer.shadow and layer.prefix == 32 and layer.lr_a.shape[-1] == 32 for layer in cache.layers)
    finally:
        handle.restore()
    assert_close_to_reference(ours, ref, dense, what="logits")


def _hand_layer() -> ShadowLayer:
    """12 tokens (D=2), chunks of 2, 1 local chunk: chunks 0-4 (rows 0-9) are factorised, 10-11 stay exact.
    Landmarks (x component): 1, 4, 0, 1, 2; chunk 3 holds (3, 1) and (-1, 1), whose worst cosine to their mean
    (1, 1) is 0: the outlier."""
    k = torch.tensor([[1, 1], [1, 1], [4, 0], [4, 0], [0, 1], [0, 1], [3, 1], [-1, 1], [2, 0], [2, 0], [0, 1],
                      [0, 1]], dtype=torch.float32).view(1, 1, 12, 2)
    layer = ShadowLayer()
    layer.update(k, k * 10)
    layer.to_shadow(chunk_size=2, rank=2, outlier_chunk=1, local_chunk=1)
    return layer


def test_landmarks_outliers_and_selection_hand_worked():
    layer = _hand_layer()
    assert layer.prefix == 10 and layer.keys.shape[2] == 2 and layer.values.shape[2] == 12
    assert layer.landmarks[0, 0, :, 0].tolist() == [1.0, 4.0, 0.0, 1.0, 2.0]
    assert layer.out_chunks[0, 0].tolist() == [False, False, False, True, False]
    assert layer.out_k[0, 0].tolist() == [[3.0, 1.0], [-1.0, 1.0]]
    policy = ShadowKV(budget=2, chunk_size=2, rank=2, outlier_chunk=1, local_chunk=1)
    sel = policy.select(0, torch.tensor([[[[1.0, 0.0]]]]), layer)
    assert sel[0, 0].nonzero().flatten().tolist() == [2, 3, 6, 7, 10, 11]  # top chunk 1, outlier 3, local
    assert layer.scored_slots == 2.5  # 5 landmark keys scored: half a slot each
    keys, values = layer.kv()  # only the read rows are rebuilt / fetched
    assert torch.allclose(keys[0, 0, [2, 3]], torch.tensor([[4.0, 0.0], [4.0, 0.0]]), atol=1e-5)
    assert keys[0, 0, [0, 1, 4, 5, 8, 9]].abs().sum() == 0 and values[0, 0, [0, 1, 4, 5, 8, 9]].abs().sum() == 0
    assert values[0, 0, [2, 3, 6, 7, 10, 11]].tolist() == [[40.0, 0.0], [40.0, 0.0], [30.0, 10.0], [-10.0, 10.0],
                                                           [0.0, 10.0], [0.0, 10.0]]


def test_sparse_read_equals_reference_on_the_selected_rows():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g)
    layer = ShadowLayer()
    layer.update(k, v)
    layer.to_shadow(chunk_size=4, rank=16, outlier_chunk=2, local_chunk=1)
    layer.update(k[:, :, :1], v[:, :, :1])  # one decoded token
    q = torch.randn(2, 4, 1, 8, generator=g)
    sel = ShadowKV(budget=8, chunk_size=4, rank=16, outlier_chunk=2, local_chunk=1).select(0, q, layer)
    assert sel.sum(-1).tolist() == [[8 + 8 + 4 + 1] * 2] * 2  # 2 chunks + 2 outlier chunks + local + new
    out = attend_cached(q, layer, sel)
    kf, vf = torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2)
    mask = MaskMod(lambda b, h, qi, kv: sel[b, h // 2, kv])
    ref = reference_attention(q.double(), kf.double(), vf.double(), mask=mask, causal=True)[0]
    low = reference_attention(q, kf, vf, mask=mask, causal=True, compute_dtype=torch.float32)[0]
    assert_close_to_reference(out, ref, low)  # rank 16 = full width 2 x 8: exact up to rounding


def test_low_budget_generation_holds_factors_and_cpu_values():
    model = tiny_llama()
    config = {"budget": 8, "chunk_size": 4, "rank": 8, "outlier_chunk": 1, "local_chunk": 1}
    handle = longattn.patch(model, decode="shadowkv", impl="reference", decode_config=config)
    try:
        cache = handle.cache()
        greedy(model, prompt(40), new=4, **cache_kwargs(model, cache))
        layer = cache.layers[0]
        assert layer.offload_mode == "values" and layer.values.device.type == "cpu"
        assert layer.prefix == 36 and layer.keys.shape[2] == 4 + 3 and layer.lr_a.shape == (1, 36, 8)
        full_keys = 40 * 2 * 16
        assert layer.lr_a.numel() + layer.lr_b.numel() + layer.keys[:, :, :4].numel() < full_keys
    finally:
        handle.restore()


def test_errors():
    with pytest.raises(ValueError, match="budget: expected an int >= 1, got 0"):
        ShadowKV(budget=0)
    with pytest.raises(ValueError, match="chunk_size: 8 does not divide budget=100"):
        ShadowKV(budget=100)
    with pytest.raises(ValueError, match="rank: expected an int >= 1, got 0"):
        ShadowKV(rank=0)
    with pytest.raises(ValueError, match="rank: 160 exceeds the key width of a layer"):
        longattn.patch(tiny_llama(), decode="shadowkv")
    with pytest.raises(ValueError, match="policy: the ShadowKV cache keeps every token"):
        _hand_layer().evict(torch.ones(1, 1, 12, dtype=torch.bool))


def test_listed(capsys):
    assert_listed("shadowkv", "ShadowKV", capsys)
