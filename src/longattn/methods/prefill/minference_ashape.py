"""MInference's A-shape (Λ-shape) head pattern (Jiang et al., NeurIPS 2024): every query attends to the first
``n_init`` tokens (attention sinks) and to its ``n_local`` most recent tokens. Static, so the estimate never reads
q and k values; it still runs per layer so a search config can mix it with dynamic heads."""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.masks.block_sparse import BlockSparse
from longattn.methods.prefill import _select
from longattn.methods.prefill.base import PrefillMethod
from longattn.methods.registry import register


def ashape_tokens(B: int, H: int, Skv: int, n_init: int, n_local: int, device) -> tuple[Tensor, Tensor]:
    """A-shape as kept columns (the sinks) and kept diagonals (the local window), bool [B, H, Skv] each."""
    pos = torch.arange(Skv, device=device)
    return (pos < n_init).expand(B, H, Skv), (pos < n_local).expand(B, H, Skv)


@register("minference_ashape", "prefill", paper="MInference 1.0 (Jiang et al. 2024), A-shape pattern")
class MInferenceAShape(PrefillMethod):
    """Sinks + local window at token granularity inside 64-token blocks. Defaults: n_init=128 sink tokens and
    n_local=4096 local tokens (StreamingLLM-style sizes; MInference's searched configs store n_init / n_local per
    head). A budget n_init + n_local larger than the context raises instead of silently running dense."""

    def __init__(self, n_init: int = 128, n_local: int = 4096, block: int = 64, token_level: bool | None = None):
        self.n_init = _select.check_int("n_init", n_init, low=0)
        self.n_local = _select.check_int("n_local", n_local)
        b = _select.check_block("block", block)
        self.block, self.token_level = (b, b), token_level

    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        self.check(q, k)
        B, H, Sq, Skv = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        _select.check_budget("n_init + n_local", self.n_init + self.n_local, Skv)
        cols, diags = ashape_tokens(B, H, Skv, self.n_init, self.n_local, q.device)
        every = torch.ones(B, H, *_select.causal_blocks(Sq, Skv, self.block, q.device).shape, dtype=torch.bool,
                           device=q.device)
        self.last_blocks = _select.build(every, Sq, Skv, self.block, columns=cols, diagonals=diags,
                                         token_level=self.token_level)
        return self.last_blocks
