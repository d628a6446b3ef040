"""The oracle itself against a naive formula (full score matrix, dense mask, torch.softmax) in float64:
chunking, GQA, bottom-right causal, masks, bias, empty rows and gradients through the checkpointed chunks."""

from __future__ import annotations

import pytest
import torch

from longattn import masks
from longattn.kernels.reference import reference_attention
from longattn.masks.block_sparse import BlockSparse


def naive(q, k, v, allowed, scale, bias=None):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias[0] @ bias[1].transpose(-1, -2)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.nan_to_num(torch.softmax(s, -1))  # rows with nothing allowed: softmax is NaN, attention is 0
    return p @ v, lse


def _qkv(Sq, Skv, Hq=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, Hq, Sq, D, generator=g, dtype=torch.float64),
            torch.randn(2, Hkv, Skv, D, generator=g, dtype=torch.float64),
            torch.randn(2, Hkv, Skv, D, generator=g, dtype=torch.float64))


def _dense(mask, B, H, Sq, Skv):
    return masks.evaluate(mask, torch.arange(B).view(-1, 1, 1, 1), torch.arange(H).view(1, -1, 1, 1),
                          torch.arange(Sq).view(1, 1, -1, 1), torch.arange(Skv).view(1, 1, 1, -1))


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
@pytest.mark.parametrize(("Sq", "Skv"), [(1, 1), (37, 37), (20, 53), (53, 20)])
def test_causal_and_masks_match_naive(chunk, Sq, Skv):
    q, k, v = _qkv(Sq, Skv)
    causal = torch.arange(Skv).view(1, -1) <= torch.arange(Sq).view(-1, 1) + (Skv - Sq)
    out, lse = reference_attention(q, k, v, causal=True, chunk=chunk)
    ro, rl = naive(q, k, v, causal, 0.25)
    torch.testing.assert_close(out, ro, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, rl, rtol=1e-12, atol=1e-12)
    mask = masks.sinks(2, 5, offset=Skv - Sq) & masks.MaskMod(lambda b, h, qi, kv: (h != 1) | (qi % 3 != 0))
    out, lse = reference_attention(q, k, v, mask=mask, chunk=chunk)
    ro, rl = naive(q, k, v, _dense(mask, 2, 4, Sq, Skv), 0.25)
    torch.testing.assert_close(out, ro, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, rl, rtol=1e-12, atol=1e-12)


def test_block_sparse_mask_and_bias_match_naive():
    q, k, v = _qkv(70, 90)
    mask = masks.sliding_window(25, offset=20)
    bs = BlockSparse.from_mask_mod(mask, 2, 4, 70, 90, (16, 32))
    g = torch.Generator().manual_seed(1)
    bias = (torch.randn(2, 4, 70, 3, generator=g, dtype=torch.float64),
            torch.randn(2, 4, 90, 3, generator=g, dtype=torch.float64))
    out, lse = reference_attention(q, k, v, mask=bs, bias=bias, scale=0.3, chunk=20)
    ro, rl = naive(q, k, v, _dense(mask, 2, 4, 70, 90), 0.3, bias)
    torch.testing.assert_close(out, ro, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, rl, rtol=1e-12, atol=1e-12)


def test_empty_rows_give_zero_and_neg_inf():
    q, k, v = _qkv(10, 10)
    out, lse = reference_attention(q, k, v, mask=masks.MaskMod(lambda b, h, qi, kv: (qi > 4) & (kv <= qi)))
    assert (out[:, :, :5] == 0).all() and torch.isneginf(lse[:, :, :5]).all()
    assert torch.isfinite(lse[:, :, 5:]).all()


def test_gradients_through_checkpointed_chunks_match_naive():
    q, k, v = (t.requires_grad_() for t in _qkv(45, 45))
    mask = masks.sliding_window(9)
    out, _ = reference_attention(q, k, v, mask=mask, chunk=8)
    g = torch.autograd.grad(out.square().sum(), (q, k, v))
    ro, _ = naive(q, k, v, _dense(mask, 2, 4, 45, 45), 0.25)
    rg = torch.autograd.grad(ro.square().sum(), (q, k, v))
    for a, b in zip(g, rg, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_packed_varlen_matches_per_sequence():
    lens = [3, 0, 40, 17]
    cu = torch.tensor([0, 3, 3, 43, 60])
    q, k, v = _qkv(60, 60)
    q, k, v = q[:1], k[:1], v[:1]
    out, lse = reference_attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_kv=cu, chunk=11)
    for i, n in enumerate(lens):
        if n:
            sl = slice(int(cu[i]), int(cu[i + 1]))
            o, ls = reference_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], causal=True)
            torch.testing.assert_close(out[:, :, sl], o, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(lse[:, :, sl], ls, rtol=1e-12, atol=1e-12)
