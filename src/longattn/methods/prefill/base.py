"""The prefill-method contract: from a layer's real queries and keys, decide which blocks to compute.

A method never launches a kernel: ``estimate`` returns a BlockSparse that ``longattn.attention`` runs on whatever
backend is chosen, so every method is measured on the same kernels and checked against the same oracle."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from longattn.masks.block_sparse import BlockSparse


class PrefillMethod(ABC):
    """Base class: subclasses implement ``estimate`` (keeping its result as ``last_blocks``) and expose their knobs
    as constructor arguments."""

    block: tuple[int, int] = (64, 64)
    last_blocks: BlockSparse | None = None  # the last estimate's blocks

    @property
    def last_density(self) -> float | None:
        """Density of the last estimate (``BlockSparse.density``: the area the kernels compute), read off its blocks
        when asked: computing it inside ``estimate`` would make every patched layer wait on the device."""
        return None if self.last_blocks is None else self.last_blocks.density()

    @abstractmethod
    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        """Blocks to compute for q [B, Hq, Sq, D] against k [B, Hkv, Skv, D] (post-RoPE), causal, bottom-right."""

    def check(self, q: Tensor, k: Tensor) -> None:
        """Validate the estimate's inputs once (shapes, GQA ratio)."""
        if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
            raise ValueError(f"q, k: expected (B, H, S, D) with equal batch and head_dim, got {tuple(q.shape)} and "
                             f"{tuple(k.shape)}")
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"k: query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")


def pooled_block_scores(q: Tensor, k: Tensor, block: tuple[int, int]) -> Tensor:
    """Block-level attention estimate [B, Hq, nQB, nKB]: softmax over kv blocks of mean-pooled q · mean-pooled k,
    causal (bottom-right) at block granularity. Pools over each block's valid tokens only."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    bq, bkv = block
    qp = _mean_pool(q, bq)
    kp = _mean_pool(k, bkv).repeat_interleave(Hq // Hkv, dim=1)
    s = qp @ kp.transpose(-1, -2) / math.sqrt(D)
    q_last = (torch.arange(qp.shape[2], device=q.device) * bq).clamp(max=Sq - 1) + (Skv - Sq)
    kv_first = torch.arange(kp.shape[2], device=q.device) * bkv
    s = s.masked_fill(kv_first.view(1, -1) > q_last.view(-1, 1), float("-inf"))
    return torch.softmax(s, dim=-1)


def _mean_pool(x: Tensor, block: int) -> Tensor:
    """float32 [B, H, ceil(S / block), D]: mean of each block of ``block`` positions (the tail block over its
    valid ones), accumulated in float32 straight from x's dtype (no float32 copy of x at long lengths)."""
    B, H, S, D = x.shape
    whole = S // block
    sums = x[:, :, : whole * block].unflatten(2, (whole, block)).sum(3, dtype=torch.float32)
    counts = torch.full((whole,), float(block), device=x.device)
    if whole * block < S:
        sums = torch.cat([sums, x[:, :, whole * block:].sum(2, keepdim=True, dtype=torch.float32)], 2)
        counts = torch.cat([counts, counts.new_full((1,), float(S - whole * block))])
    return sums / counts.view(1, 1, -1, 1)
