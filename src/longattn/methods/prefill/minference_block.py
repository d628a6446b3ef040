"""MInference's block-sparse head pattern (Jiang et al., NeurIPS 2024): mean-pool queries and keys per 64-token
block, score blocks with the pooled dot product, and let every query block attend to its top-k kv blocks."""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.masks.block_sparse import BlockSparse
from longattn.methods.prefill import _select
from longattn.methods.prefill.base import PrefillMethod, pooled_block_scores
from longattn.methods.registry import register


@register("minference_block", "prefill", paper="MInference 1.0 (Jiang et al. 2024), block-sparse pattern")
class MInferenceBlockSparse(PrefillMethod):
    """Top-k kv blocks per query block from pooled Q·K scores; the diagonal block is always kept so every query
    sees at least itself. Defaults: 64-token blocks, top_k=100 blocks (MInference's block-sparse budget)."""

    def __init__(self, top_k: int = 100, block: int = 64):
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k: expected a positive int (kv blocks per query block), got {top_k!r}")
        if not isinstance(block, int) or block < 32 or block & (block - 1):
            raise ValueError(f"block: expected a power of two >= 32, got {block!r}")
        self.top_k, self.block = top_k, (block, block)

    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        self.check(q, k)
        Sq, Skv = q.shape[2], k.shape[2]
        scores = pooled_block_scores(q, k, self.block)
        n_kv = scores.shape[-1]
        top = scores.topk(min(self.top_k, n_kv), dim=-1).indices
        _, q_last, _, _ = _select.geometry(Sq, Skv, self.block, q.device)
        diagonal = (q_last // self.block[1]).view(-1, 1)  # kv block of each query block's last query
        top = torch.where(top <= diagonal, top, -1)  # top-k picks masked (zero-score) blocks when fewer are reachable
        lists = torch.cat([top, diagonal.expand(*top.shape[:-1], 1)], -1)
        within = _select.resolved_causal(Sq, Skv, self.block, q.device)
        self.last_blocks = BlockSparse.from_block_lists(lists, Sq, Skv, self.block, within=within, trusted=True)
        return self.last_blocks
