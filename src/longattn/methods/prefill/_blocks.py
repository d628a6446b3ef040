"""Shared block geometry of the part-B prefill methods: which kv blocks a query block can reach, which hold its
diagonal, and how a per-head selection becomes one BlockSparse (knob checks live in ``_select``).

Every method here keeps the *diagonal* blocks (those holding some query's own position) and keeps each query's
own key inside them, so no row is ever empty; every other reachable block lies wholly below the diagonal, so a
block whose pairs the method's token rule selects always has a causal selected pair. That makes the block map a
method builds exact: ``BlockSparse.density()`` equals the density the method reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from longattn import masks
from longattn.masks.block_sparse import BlockSparse, TileFn
from longattn.masks.core import MaskMod
from longattn.methods.prefill._select import check_block


@dataclass(frozen=True)
class Geometry:
    """Block grid of one (Sq, Skv) call; query positions are absolute (``q_idx + Skv - Sq``)."""

    q_first: Tensor  # int64 [nQB] absolute position of each query block's first query
    q_last: Tensor  # int64 [nQB]
    kv_first: Tensor  # int64 [nKB]
    kv_last: Tensor  # int64 [nKB]
    area: Tensor  # float64 [nQB, nKB] valid query x key pairs of each block
    block: tuple[int, int]
    seq_q: int
    seq_kv: int

    @property
    def offset(self) -> int:
        return self.seq_kv - self.seq_q

    def reachable(self) -> Tensor:
        """bool [nQB, nKB]: the block holds at least one causal pair."""
        return self.kv_first.view(1, -1) <= self.q_last.view(-1, 1)

    def diagonal(self) -> Tensor:
        """bool [nQB, nKB]: the kv block holds the position of some query of the block (the d = 0 pairs)."""
        return (self.kv_first.view(1, -1) <= self.q_last.view(-1, 1)) & (self.kv_last.view(1, -1) >=
                                                                          self.q_first.view(-1, 1))

    def window(self, w: Tensor) -> Tensor:
        """bool [..., nQB, nKB] for windows ``w`` [...]: the block holds a pair with ``0 <= q_pos - kv < w``."""
        dmin = (self.q_first.view(-1, 1) - self.kv_last.view(1, -1)).clamp(min=0)
        dmax = self.q_last.view(-1, 1) - self.kv_first.view(1, -1)
        return dmin <= torch.minimum(dmax, w.view(*w.shape, 1, 1) - 1)


def geometry(seq_q: int, seq_kv: int, block: tuple[int, int], device: torch.device) -> Geometry:
    """The block grid for queries at the last ``seq_q`` of ``seq_kv`` positions (bottom-right causal)."""
    bq, bkv = block
    off = seq_kv - seq_q
    q_first = torch.arange(0, seq_q, bq, device=device)
    q_last = (q_first + bq - 1).clamp(max=seq_q - 1)
    kv_first = torch.arange(0, seq_kv, bkv, device=device)
    kv_last = (kv_first + bkv - 1).clamp(max=seq_kv - 1)
    area = (q_last - q_first + 1).double().view(-1, 1) * (kv_last - kv_first + 1).double().view(1, -1)
    return Geometry(q_first + off, q_last + off, kv_first, kv_last, area, block, seq_q, seq_kv)


def to_block_sparse(selected: Tensor, geo: Geometry, rule: MaskMod | None = None,
                    tiles: TileFn | None = None) -> BlockSparse:
    """One BlockSparse from per-head selections [B, H, nQB, nKB] (diagonal blocks added, unreachable dropped);
    inside the blocks, causal & (``rule`` | own key), whose packed tiles ``tiles`` may build directly (see
    ``BlockSparse.from_block_mask``)."""
    selected = (selected | geo.diagonal()) & geo.reachable()
    within = masks.causal(offset=geo.offset)
    if rule is not None:
        within = within & (rule | own_key(geo.offset))
    return BlockSparse.from_block_mask(selected, geo.seq_q, geo.seq_kv, geo.block, within=within, within_tiles=tiles)


def own_key(offset: int) -> MaskMod:
    """Each query's own key (absolute position q + offset), the pair every method keeps."""
    return masks.sliding_window(1, offset=offset)


def square_block(block: object) -> tuple[int, int]:
    """The ``block`` knob as a square (query, kv) block size, checked as the kernels need."""
    side = check_block("block", block)
    return side, side


def label_blocks(q_labels: Tensor, k_labels: Tensor, n_labels: int, geo: Geometry) -> Tensor:
    """bool [B, H, nQB, nKB]: some query of the block and some key of the block share a label.
    q_labels [B, H, Sq], k_labels [B, H, Skv] in [0, n_labels); cost O(S * n_labels / block) per head."""
    qp = presence(q_labels, n_labels, geo.block[0])
    kp = presence(k_labels, n_labels, geo.block[1])
    return (qp @ kp.transpose(-1, -2)) > 0


def presence(labels: Tensor, n_labels: int, block: int) -> Tensor:
    """float [B, H, nBlocks, n_labels]: 1 where the label occurs among the block's ``block`` positions."""
    B, H, S = labels.shape
    n = math.ceil(S / block)
    blk = torch.arange(S, device=labels.device) // block
    out = torch.zeros(B, H, n * n_labels, device=labels.device)
    out.scatter_(-1, blk * n_labels + labels, 1.0)
    return out.view(B, H, n, n_labels)
