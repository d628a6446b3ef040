"""HiP attention (Lee et al., ICLR 2025, "A training-free, sub-quadratic attention by hierarchical pruning"): each
query block starts from k equal chunks of its causal key range and repeatedly halves them, keeping the k halves
whose representative key scores highest, until the chunks are single key blocks. The representatives' scores
are read from the pooled (block-level) score matrix, computed a slice of query blocks at a time."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longattn.kernels.halving import halving_search
from longattn.masks.block_sparse import BlockSparse
from longattn.methods.prefill import _select
from longattn.methods.prefill.base import PrefillMethod, _mean_pool
from longattn.methods.registry import register

_SCORE_CHUNK_BYTES = 1 << 29  # pooled scores held at once: bounds memory at long contexts (128k, 32 heads and
# bf16 scores fit in one slice)


def hierarchical_topk(qp: Tensor, kp: Tensor, reach: Tensor, k: int, start: Tensor | None = None) -> Tensor:
    """int64 [B, H, nQB, k]: per query block (pooled query qp [B, H, nQB, D]), the k key blocks (pooled keys kp
    [B, H, nKB, D], searched ones are [start[i], reach[i]), start 0 by default) found by halving chunks and
    keeping the top k (each half scored by its first block); -1 where fewer than k blocks are in range.

    The scores a halving step reads are entries of the pooled score matrix qp · kp^T, so a slice of query blocks
    gets that matrix from one GEMM and the steps gather from it: the same selection as scoring each half's
    representative on the fly, without gathering k key vectors per query block per step (2 GB per step at 128k)."""
    B, H, nQB, _ = qp.shape
    rows = max(1, _SCORE_CHUNK_BYTES // (B * H * kp.shape[2] * qp.element_size()))
    picks = [halving_search(qp[:, :, lo:lo + rows] @ kp.transpose(-1, -2), reach[lo:lo + rows], k,
                            start=None if start is None else start[lo:lo + rows]) for lo in range(0, nQB, rows)]
    return torch.cat(picks, 2)


@register("hip", "prefill", paper="HiP attention (Lee et al., ICLR 2025), hierarchical top-k block pruning")
class HiP(PrefillMethod):
    """Hierarchically pruned top-k key blocks per query block, plus attention sinks and a sliding window. Defaults
    follow the authors' release (``hip_attn`` v1.1 ``HiPAttentionArgs``): mask_k=512 key tokens per 64-query block,
    16 sink tokens, a 256-token sliding window. Their 2-token key blocks are coarsened to 32-token key blocks (the
    smallest our kernels take), so top_k=512 keeps 16 key blocks, and the sinks and the window are kept as the key
    blocks that hold them (plus every block on the query block's diagonal, so no row is empty). As in the release,
    the top-k budget is spent outside the sinks and the window: the search covers the key blocks between the sink
    blocks and the query block's first window block. Halves are scored by their first block's mean key against the
    query block's mean query. Budgets larger than the context raise."""

    def __init__(self, top_k: int = 512, block_q: int = 64, block_kv: int = 32, sink_tokens: int = 16,
                 window: int = 256):
        self.top_k = _select.check_int("top_k", top_k)
        self.block = (_select.check_block("block_q", block_q), _select.check_block("block_kv", block_kv))
        self.sink_tokens = _select.check_int("sink_tokens", sink_tokens, low=0)
        self.window = _select.check_int("window", window, low=0)

    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        self.check(q, k)
        B, H, Sq, _ = q.shape
        Hkv, Skv = k.shape[1], k.shape[2]
        for name, budget in (("top_k", self.top_k), ("sink_tokens", self.sink_tokens), ("window", self.window)):
            _select.check_budget(name, budget, Skv)
        bq, bkv = self.block
        q_lo, q_hi, _, _ = _select.geometry(Sq, Skv, self.block, q.device)
        # 16-bit inputs are scored in bfloat16 (fp32 accumulation, bf16 scores: fp32 scoring took 4 ms per layer at
        # 128k on an H200), fp32/fp64 inputs in fp32
        score_dtype = torch.bfloat16 if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
        qp = _mean_pool(q, bq).to(score_dtype)
        kp = _mean_pool(k, bkv).to(score_dtype).repeat_interleave(H // Hkv, dim=1)
        n_sinks, first = math.ceil(self.sink_tokens / bkv), self._first_window_block(q_lo)
        picks = hierarchical_topk(qp, kp, first, math.ceil(self.top_k / bkv), torch.full_like(first, n_sinks))
        lists = torch.cat([picks, self._fixed_blocks(n_sinks, first, q_hi).expand(B, H, -1, -1)], -1)
        within = _select.resolved_causal(Sq, Skv, self.block, q.device)
        self.last_blocks = BlockSparse.from_block_lists(lists, Sq, Skv, self.block, within=within, trusted=True)
        return self.last_blocks

    def _first_window_block(self, q_lo: Tensor) -> Tensor:
        """int64 [nQB]: the key block holding the window start of each query block's first query (window 0 still
        keeps each query's own key)."""
        return (q_lo - max(self.window, 1) + 1).clamp(min=0) // self.block[1]

    def _fixed_blocks(self, n_sinks: int, first: Tensor, q_hi: Tensor) -> Tensor:
        """int64 [1, 1, nQB, n]: per query block, the key blocks holding the sink tokens and the window (from the
        first query's window start to the last query's own key); -1 pads."""
        bq, bkv = self.block
        sinks = torch.arange(n_sinks, device=first.device)
        span = first.view(-1, 1) + torch.arange(math.ceil((max(self.window, 1) + bq - 1) / bkv) + 1,
                                                device=first.device)
        window = torch.where(span <= (q_hi // bkv).view(-1, 1), span, -1)
        return torch.cat([sinks.expand(len(first), -1), window], -1).view(1, 1, len(first), -1)
