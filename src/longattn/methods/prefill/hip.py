"""HiP attention (Lee et al., ICLR 2025, "A training-free, sub-quadratic attention by hierarchical pruning"): each
query block starts from k equal chunks of its causal key range and repeatedly halves them, keeping the k halves
whose representative key scores highest, until the chunks are single key blocks: O(S · k · log S) work, never
the full score map."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longattn.masks.block_sparse import BlockSparse
from longattn.methods.prefill import _select
from longattn.methods.prefill.base import PrefillMethod, _mean_pool
from longattn.methods.registry import register


def hierarchical_topk(qp: Tensor, kp: Tensor, reach: Tensor, k: int) -> Tensor:
    """bool [B, H, nQB, nKB]: per query block (pooled query qp [B, H, nQB, D]), the k key blocks (pooled keys kp
    [B, H, nKB, D], causally reachable ones are [0, reach[i])) found by halving chunks and keeping the top k
    (each half scored by its first block)."""
    B, H, nQB, _ = qp.shape
    nKB = kp.shape[2]
    j = torch.arange(k, device=qp.device)
    n = reach.view(-1, 1)
    starts = (j * n // k).expand(B, H, nQB, k)
    ends = ((j + 1) * n // k).expand(B, H, nQB, k)
    while bool(((ends - starts) > 1).any()):
        mid = (starts + ends + 1) // 2
        s2, e2 = torch.cat([starts, mid], -1), torch.cat([mid, ends], -1)
        rep = s2.clamp(0, nKB - 1)  # each half is represented by its first block (the release's 'first' sampling)
        keys = kp.gather(2, rep.view(B, H, -1, 1).expand(-1, -1, -1, kp.shape[-1])).view(B, H, nQB, 2 * k, -1)
        score = (keys @ qp.unsqueeze(-1)).squeeze(-1).masked_fill(e2 <= s2, float("-inf"))
        top = score.topk(k, dim=-1).indices
        starts, ends = s2.gather(-1, top), e2.gather(-1, top)
    selected = torch.zeros(B, H, nQB, nKB + 1, dtype=torch.bool, device=qp.device)
    selected.scatter_(-1, torch.where(ends > starts, starts, nKB), True)  # empty chunks land in a spill column
    return selected[..., :nKB]


@register("hip", "prefill", paper="HiP attention (Lee et al., ICLR 2025), hierarchical top-k block pruning")
class HiP(PrefillMethod):
    """Hierarchically pruned top-k key blocks per query block. Defaults follow the authors' ``hip_attention``:
    top_k=512 key tokens (mask_k) per 32-query block (block_size_q); their 1-2-token key blocks are coarsened to
    32-token key blocks (the smallest our kernels take), so top_k=512 keeps 16 key blocks. Halves are scored by their
    first block's mean key against the query block's mean query. The diagonal block is always kept (standing in for
    the release's sliding window); top_k larger than the context raises."""

    def __init__(self, top_k: int = 512, block_q: int = 32, block_kv: int = 32):
        self.top_k = _select.check_int("top_k", top_k)
        self.block = (_select.check_block("block_q", block_q), _select.check_block("block_kv", block_kv))
        self.last_density: float | None = None

    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        self.check(q, k)
        H, Sq, Skv = q.shape[1], q.shape[2], k.shape[2]
        _select.check_budget("top_k", self.top_k, Skv)
        diag = _select.diagonal_blocks(Sq, Skv, self.block, q.device)
        reach = diag.int().argmax(-1) + 1
        qp = _mean_pool(q.float(), self.block[0])
        kp = _mean_pool(_select.repeat_kv(k, H).float(), self.block[1])
        kblocks = math.ceil(self.top_k / self.block[1])
        selected = hierarchical_topk(qp, kp, reach, kblocks) | diag
        bs, self.last_density = _select.build(selected, Sq, Skv, self.block)
        return bs
