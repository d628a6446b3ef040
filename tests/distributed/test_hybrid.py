"""Hybrid context parallelism on 4 gloo ranks (Ulysses groups of 2 × a ring of 2) against the single-process oracle:
outputs, LSE and gradients, causal and not, a per-head mask, GQA; the mesh's groups and sharding round trip."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from longattn import attention, masks
from longattn.distributed import hybrid_attention, hybrid_groups, hybrid_shard, hybrid_unshard
from tests.distributed.launch import spawn


def check_hybrid(rank: int, world: int, ulysses_size: int) -> None:
    ulysses_group, ring_group = hybrid_groups(ulysses_size)
    assert dist.get_world_size(ulysses_group) == ulysses_size and dist.get_rank(ring_group) == rank // ulysses_size
    g = torch.Generator().manual_seed(5)
    S = 2 * world * 3
    q, k, v = (torch.randn(1, h, S, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    g_out, g_lse = torch.randn(1, 4, S, 16, generator=g, dtype=torch.float64), torch.randn(1, 4, S, generator=g)

    def part(t):
        return hybrid_shard(t.detach(), rank, world, ulysses_size)

    torch.testing.assert_close(hybrid_unshard(part(q), ulysses_group, ring_group), q, rtol=0, atol=0)
    per_head = masks.per_head_window([1, 4, 9, S])  # global head indices must survive the all-to-all
    for causal, mask in ((False, None), (True, None), (True, per_head)):
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = attention(*full, mask=mask, causal=causal, impl="reference", return_lse=True)
        ((out * g_out).sum() + (lse * g_lse).sum()).backward()
        local = [part(t).requires_grad_() for t in (q, k, v)]
        out_l, lse_l = hybrid_attention(*local, ulysses_group=ulysses_group, ring_group=ring_group, mask=mask,
                                        causal=causal, impl="reference", return_lse=True)
        ((out_l * part(g_out)).sum() + (lse_l * part(g_lse)).sum()).backward()
        torch.testing.assert_close(out_l, part(out), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse_l, part(lse), rtol=1e-10, atol=1e-10)
        for name, mine, ref in zip("qkv", local, full, strict=True):
            torch.testing.assert_close(mine.grad, part(ref.grad), rtol=1e-10, atol=1e-10,
                                       msg=lambda m, n=name, c=causal, mk=mask: f"d{n} {c=} {mk}: {m}")
    with pytest.raises(ValueError, match="ulysses_size"):
        hybrid_groups(3)


def test_hybrid_matches_oracle():
    spawn(check_hybrid, 4, 2)
