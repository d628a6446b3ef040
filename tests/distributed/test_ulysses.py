"""Ulysses attention on 2 gloo ranks against the single-process oracle: dense, causal, a sliding window and a
head-dependent mask (global head indices through the all-to-all), GQA, outputs, LSE and gradients."""

from __future__ import annotations

import pytest
import torch

from longattn import BlockSparse, attention, masks
from longattn.distributed import shard, ulysses_attention
from tests.distributed.launch import spawn


def _head_window(b, h, q, kv):
    return (kv <= q) & (q - kv <= h + 1)  # head h sees its last h + 2 keys: wrong global heads show at once


MASKS = {"none": None, "sliding": masks.sliding_window(5), "per_head": _head_window}


def check_ulysses(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(3)
    S = 6 * world
    q, k, v = (torch.randn(1, h, S, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    g_out, g_lse = torch.randn(1, 4, S, 16, generator=g, dtype=torch.float64), torch.randn(1, 4, S, generator=g)
    for name, mask in MASKS.items():
        causal = name == "none"
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = attention(*full, mask=mask, causal=causal, impl="reference", return_lse=True)
        ((out * g_out).sum() + (lse * g_lse).sum()).backward()
        local = [shard(t, rank, world).detach().requires_grad_() for t in (q, k, v)]
        out_l, lse_l = ulysses_attention(*local, mask=mask, causal=causal, impl="reference", return_lse=True)
        ((out_l * shard(g_out, rank, world)).sum() + (lse_l * shard(g_lse, rank, world)).sum()).backward()
        torch.testing.assert_close(out_l, shard(out.detach(), rank, world), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse_l, shard(lse.detach(), rank, world), rtol=1e-10, atol=1e-10)
        for t, mine, ref in zip("qkv", local, full, strict=True):
            torch.testing.assert_close(mine.grad, shard(ref.grad, rank, world), rtol=1e-10, atol=1e-10,
                                       msg=lambda m, t=t, n=name: f"d{t} with mask {n}: {m}")
    q_l, k_l, v_l = (t.detach() for t in local)
    with pytest.raises(ValueError, match="k: 1 heads do not split over 2 ranks"):
        ulysses_attention(q_l[:, :2], k_l[:, :1], v_l[:, :1])
    with pytest.raises(TypeError, match="mask"):
        ulysses_attention(q_l, k_l, v_l, mask=BlockSparse.from_mask_mod(masks.causal(), 1, 4, S, S, (16, 32)))


def test_ulysses_matches_oracle():
    spawn(check_ulysses, 2)
