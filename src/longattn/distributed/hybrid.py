"""Hybrid context parallelism (the 2-D scheme of USP, Fang & Zhao, 2024): Ulysses inside groups of U consecutive
ranks (the all-to-all where bandwidth is high, e.g. within a node) and the ring across the R = W / U groups (where
heads would run out). Global rank r·U + u is piece u of ring shard r: the Ulysses all-to-all gathers a ring shard
for H/U heads, ring attention runs over the R groups, a second all-to-all returns the sequence pieces."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from longattn.distributed.ring import ring_attention
from longattn.distributed.sharding import as_global_mask, check_qkv, group_info, shard, unshard
from longattn.distributed.ulysses import _AllToAll


def hybrid_groups(ulysses_size: int):
    """(Ulysses group, ring group) of this rank in a mesh of the whole world: U = ``ulysses_size`` consecutive
    ranks per Ulysses group. Collective: every rank must call it (it creates every group in the same order)."""
    rank, world = group_info(None)
    if ulysses_size < 1 or world % ulysses_size:
        raise ValueError(f"ulysses_size: expected a divisor of the world size {world}, got {ulysses_size}")
    rings = world // ulysses_size
    mine = {}
    for r in range(rings):
        ranks = [r * ulysses_size + u for u in range(ulysses_size)]
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["ulysses"] = group
    for u in range(ulysses_size):
        ranks = [r * ulysses_size + u for r in range(rings)]
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["ring"] = group
    return mine["ulysses"], mine["ring"]


def hybrid_shard(x: Tensor, rank: int, world: int, ulysses_size: int, *, layout: str = "zigzag",
                 dim: int = 2) -> Tensor:
    """This rank's part of a full sequence: piece ``rank % U`` of ring shard ``rank // U`` in ``layout``."""
    ring_shard = shard(x, rank // ulysses_size, world // ulysses_size, layout=layout, dim=dim)
    return shard(ring_shard, rank % ulysses_size, ulysses_size, dim=dim)


def hybrid_unshard(local: Tensor, ulysses_group, ring_group, *, layout: str = "zigzag", dim: int = 2) -> Tensor:
    """Reassemble the full sequence from every rank's piece (not differentiable)."""
    return unshard(unshard(local, ulysses_group, dim=dim), ring_group, layout=layout, dim=dim)


def hybrid_attention(q: Tensor, k: Tensor, v: Tensor, *, ulysses_group, ring_group, mask=None, causal: bool = False,
                     scale: float | None = None, layout: str = "zigzag", impl: str = "auto",
                     return_lse: bool = False):
    """Exact attention over a sequence sharded by ``hybrid_shard``: Ulysses all-to-all within ``ulysses_group``,
    ring attention across ``ring_group`` (both from ``hybrid_groups``). ``mask``: None or a mask_mod over global
    positions and heads. Differentiable; q and kv heads must split over the Ulysses group."""
    check_qkv(q, k, v)
    u_rank, ulysses = group_info(ulysses_group)
    for name, heads in (("q", q.shape[1]), ("k", k.shape[1])):
        if heads % ulysses:
            raise ValueError(f"{name}: {heads} heads do not split over a Ulysses group of {ulysses} ranks")
    mask = as_global_mask(mask, "hybrid_attention")
    if mask is not None:
        mask = mask.head_offset(u_rank * q.shape[1] // ulysses)
    heads_q, heads_k, heads_v = (_AllToAll.apply(t, ulysses_group, 1, 2) for t in (q, k, v))
    result = ring_attention(heads_q, heads_k, heads_v, mask=mask, causal=causal, scale=scale, group=ring_group,
                            layout=layout, impl=impl, return_lse=return_lse)
    if not return_lse:
        return _AllToAll.apply(result, ulysses_group, 2, 1)
    out, lse = result
    return _AllToAll.apply(out, ulysses_group, 2, 1), _AllToAll.apply(lse, ulysses_group, 2, 1)
