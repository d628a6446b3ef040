"""FlexPrefill (Lai et al., ICLR 2025): per head, decide from the last query block whether the cheap pooled
estimate of attention is trustworthy (query-aware pattern) or not (vertical-slash pattern), then keep the fewest
blocks, columns and diagonals whose estimated attention mass reaches gamma."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longattn.masks.block_sparse import BlockSparse
from longattn.methods.prefill import _select
from longattn.methods.prefill.base import PrefillMethod, _mean_pool, pooled_block_scores
from longattn.methods.registry import register


def js_distance(p: Tensor, q: Tensor) -> Tensor:
    """sqrt of the Jensen-Shannon divergence (natural log) between distributions on the last dim."""
    m = (p + q) / 2

    def kl(a: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a.clamp(min=1e-30).log() - m.clamp(min=1e-30).log()), 0.0).sum(-1)

    return ((kl(p) + kl(q)) / 2).clamp(min=0).sqrt()


def block_sums(p: Tensor, block: int) -> Tensor:
    """Sum a distribution [..., S] over consecutive blocks of ``block`` entries: [..., ceil(S / block)]."""
    n = math.ceil(p.shape[-1] / block)
    return torch.nn.functional.pad(p, (0, n * block - p.shape[-1])).view(*p.shape[:-1], n, block).sum(-1)


@register("flexprefill", "prefill", paper="FlexPrefill (Lai et al., ICLR 2025)")
class FlexPrefill(PrefillMethod):
    """Query-aware head when sqrt(JS(true, estimated block distribution of the last query block)) < tau, else
    vertical-slash; each keeps the fewest entries reaching a gamma share of its estimated mass. Defaults from the
    paper: gamma=0.9, tau=0.1, 128-token blocks. Query-aware selection is global over the head's pooled block map,
    as in the paper; on vertical-slash heads the diagonals are realised at block granularity (every block a kept
    diagonal crosses) and the kept columns are gathered by index (work proportional to the columns, not to the blocks
    they fall in; Triton runs it forward only). The diagonal block of every query block is always
    kept so no row is empty. gamma=1 keeps every causal block."""

    def __init__(self, gamma: float = 0.9, tau: float = 0.1, block: int = 128):
        self.gamma = _select.check_fraction("gamma", gamma)
        self.tau = _select.check_fraction("tau", tau, low_open=False)
        b = _select.check_block("block", block)
        self.block = (b, b)
        self.last_query_aware: Tensor | None = None  # bool [B, Hq]: which heads took the query-aware pattern

    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        self.check(q, k)
        B, H, Sq, D = q.shape
        Skv, bkv = k.shape[2], self.block[1]
        L = min(self.block[0], Sq)
        p = _select.last_q_attention(q, k, L)  # [B, H, L, Skv]
        true_blocks = block_sums(p, bkv).mean(2)
        kp = _select.repeat_kv(_mean_pool(k, bkv), H)  # pool the kv heads, then repeat: no fp32 copy of k
        est = torch.softmax(kp @ q[:, :, -L:].float().mean(2, keepdim=True).transpose(-1, -2) / math.sqrt(D), dim=-2)
        query_aware = js_distance(true_blocks, est.squeeze(-1)) < self.tau

        scores = pooled_block_scores(q, k, self.block)  # [B, H, nQB, nKB], rows sum to 1 over causal blocks
        aware = _select.cumulative_mask(scores.flatten(2), self.gamma).view_as(scores)
        vertical, slash = _select.vertical_slash_scores(p)
        cols, diags = _select.cumulative_mask(vertical, self.gamma), _select.cumulative_mask(slash, self.gamma)
        vs = _select.token_blocks(torch.zeros_like(cols), diags, Sq, Skv, self.block)  # slash lines: their blocks
        selected = torch.where(query_aware.view(B, H, 1, 1), aware, vs)
        selected |= _select.diagonal_blocks(Sq, Skv, self.block, q.device)
        gather = cols & ~query_aware.view(B, H, 1)  # vertical lines of vertical-slash heads: gathered by index
        self.last_blocks = _select.build(selected, Sq, Skv, self.block, gather=gather)
        self.last_query_aware = query_aware
        return self.last_blocks
