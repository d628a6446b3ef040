"""How a sequence is split over the ranks of a context-parallel group, and the small torch.distributed helpers the
ring and Ulysses paths share (rank, world size, peers, one validated entry check).

Layouts: "contiguous" (rank r holds tokens [r·n, (r+1)·n)) and "zigzag" (the sequence cut into 2W chunks, rank r
holds chunks r and 2W-1-r), which gives every rank the same causal work (the load balancing of ring-flash-attention's
zigzag variant and of Llama 3's context parallelism)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from longattn.api import IMPLS, _is_flex_block_mask
from longattn.masks.block_sparse import BlockSparse
from longattn.masks.core import MaskMod, as_mask_mod

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def group_info(group) -> tuple[int, int]:
    """(rank, world size) within ``group`` (None: the default group); a clear error when nothing is initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("group: torch.distributed is not initialised; launch with torchrun and call "
                           "torch.distributed.init_process_group('nccl' on GPUs, 'gloo' on CPU) first")
    return dist.get_rank(group), dist.get_world_size(group)


def peer(group, rank: int) -> int:
    """Global rank of ``rank`` within ``group`` (point-to-point ops address global ranks)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def chunk_ids(world: int, layout: str) -> list[list[int]]:
    """Per rank, which of the sequence's equal chunks (``world`` of them, ``2 * world`` for zigzag) it holds, in
    order."""
    if layout == "contiguous":
        return [[r] for r in range(world)]
    return [[r, 2 * world - 1 - r] for r in range(world)]


def shard(x: Tensor, rank: int, world: int, *, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """The part of a full-sequence tensor that ``rank`` of ``world`` holds (sequence along ``dim``)."""
    check_layout(layout)
    n_chunks = world * (2 if layout == "zigzag" else 1)
    S = x.shape[dim]
    if S % n_chunks:
        raise ValueError(f"x: sequence length {S} (dim {dim}) must split into {n_chunks} equal chunks for "
                         f"{world} ranks with layout={layout!r}; pad the sequence")
    parts = x.chunk(n_chunks, dim)
    return torch.cat([parts[c] for c in chunk_ids(world, layout)[rank]], dim)


def positions(rank: int, world: int, seq_len: int, *, layout: str = "contiguous", device=None) -> Tensor:
    """Global token positions of ``rank``'s shard (for rotary embeddings applied after sharding)."""
    return shard(torch.arange(seq_len, device=device), rank, world, layout=layout, dim=0)


def unshard(local: Tensor, group=None, *, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """Gather every rank's shard and reassemble the full sequence (not differentiable; for checks and outputs)."""
    check_layout(layout)
    _, world = group_info(group)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local.contiguous(), group=group)
    parts = {}
    for got, owned in zip(gathered, chunk_ids(world, layout), strict=True):
        parts.update(zip(owned, got.chunk(len(owned), dim), strict=True))
    return torch.cat([parts[c] for c in sorted(parts)], dim)


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")


def as_global_mask(mask, who: str) -> MaskMod | None:
    """A context-parallel call's mask as a MaskMod over global positions and heads; block masks are refused (they
    are built for one shard layout and head slice)."""
    if mask is None:
        return None
    if isinstance(mask, BlockSparse) or _is_flex_block_mask(mask):
        raise TypeError(f"mask: {who} takes a mask_mod (b, h, q_idx, kv_idx) over global positions and heads "
                        f"(block masks are built for one shard layout), got {type(mask).__name__}")
    return as_mask_mod(mask)


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Shapes of local (batch, heads, seq, head_dim) shards: one check at the public boundary."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-d (batch, heads, seq, head_dim) tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if k.shape != v.shape:
        raise ValueError(f"k/v: expected equal shapes, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q/k: local shards must share batch, seq and head_dim, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q/k: q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.device != k.device or q.device != v.device:
        raise ValueError(f"q/k/v: expected one dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                         f"{q.device}/{k.device}/{v.device}")
