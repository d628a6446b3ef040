"""Ulysses attention (DeepSpeed-Ulysses, Jacobs et al., 2023): an all-to-all turns sequence shards into head shards,
so each rank runs ordinary attention over the whole sequence for H/W heads, and a second all-to-all turns the
output back. Any mask_mod works unchanged — it sees global positions and, through ``MaskMod.head_offset``, global
head indices — and the local call takes whatever backend suits it (SDPA for plain causal); heads (query and kv)
must divide by the group size."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from longattn.api import attention
from longattn.distributed.sharding import as_global_mask, check_impl, check_qkv, group_info


class _AllToAll(torch.autograd.Function):
    """Split ``x`` along ``scatter_dim`` into one part per rank, send part i to rank i, and concatenate what
    arrives along ``gather_dim`` in rank order; the gradient takes the reverse trip."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.args = (group, scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        group, scatter_dim, gather_dim = ctx.args
        return _all_to_all(grad, group, gather_dim, scatter_dim), None, None, None


def _all_to_all(x: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
    _, world = group_info(group)
    send = torch.stack(x.chunk(world, scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), gather_dim)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, *, mask=None, causal: bool = False,
                      scale: float | None = None, group=None, impl: str = "auto", return_lse: bool = False,
                      **attention_kwargs):
    """Attention over a sequence sharded contiguously across ``group`` (rank r holds tokens [r·n, (r+1)·n)): two
    all-to-alls around one local ``longattn.attention`` call over all tokens and H/W heads. ``mask``: None or a
    mask_mod over global positions and global head indices. Returns this rank's output shard (and float32 LSE)."""
    check_qkv(q, k, v)
    check_impl(impl)
    rank, world = group_info(group)
    for name, heads in (("q", q.shape[1]), ("k", k.shape[1])):
        if heads % world:
            raise ValueError(f"{name}: {heads} heads do not split over {world} ranks; Ulysses needs heads "
                             f"divisible by the group size (use ring_attention)")
    mask = as_global_mask(mask, "ulysses_attention")
    if mask is not None:
        mask = mask.head_offset(rank * q.shape[1] // world)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    heads_q, heads_k, heads_v = (_AllToAll.apply(t, group, 1, 2) for t in (q, k, v))
    result = attention(heads_q, heads_k, heads_v, mask=mask, causal=causal, scale=scale, impl=impl,
                       return_lse=return_lse, **attention_kwargs)
    if not return_lse:
        return _AllToAll.apply(result, group, 2, 1)
    out, lse = result
    return _AllToAll.apply(out, group, 2, 1), _AllToAll.apply(lse, group, 2, 1)
