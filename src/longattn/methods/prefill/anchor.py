"""AnchorAttention (Zhang et al. 2025, "Difference-Aware Sparse Attention with Stripe Granularity"): compute an
*anchor* (the largest attention logit over the initial tokens and the local window, which hold the maxima in
practice), then keep every key whose estimated logit comes within ``theta`` of the anchor, as key *stripes*."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longattn import masks
from longattn.masks.block_sparse import BlockSparse
from longattn.masks.core import MaskMod
from longattn.methods.prefill._blocks import geometry, square_block, to_block_sparse
from longattn.methods.prefill._select import check_budget, check_int
from longattn.methods.prefill.base import PrefillMethod
from longattn.methods.registry import register


@register("anchor", "prefill", paper="AnchorAttention (Zhang et al. 2025), difference-aware stripe sparsity")
class AnchorAttention(PrefillMethod):
    """Per query block of ``block`` tokens: anchor = mean over its queries of the max logit on the first kv block
    and the ``local`` most recent keys (computed exactly); a key stripe is kept when the block-mean logit
    (pooled query · key) is >= anchor - ``theta``. Stripes are kept at token granularity (bit tiles inside the
    selected blocks), with the first block and the local window always kept.

    Defaults: block 128 and theta 12 (our reading of the paper's main setting), local window = one block.
    theta = inf keeps every key (dense). Cost: one pooled logit per (query block, key), i.e. S^2 / block per head,
    the paper's own estimate; the stripe table has the same size (bool).
    """

    def __init__(self, theta: float = 12.0, block: int = 128, local: int | None = None):
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            raise ValueError(f"theta: expected a positive number (logit gap to the anchor), got {theta!r}")
        self.theta, self.block = float(theta), square_block(block)
        self.local = check_int("local", block if local is None else local)

    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        self.check(q, k)
        B, Hq, Sq, D = q.shape
        Skv = k.shape[2]
        check_budget("local", self.local, Skv, "tokens")
        geo = geometry(Sq, Skv, self.block, q.device)
        bq, bkv = self.block
        n_q, n_kv = geo.q_first.numel(), geo.kv_first.numel()
        kx = k.float().repeat_interleave(Hq // k.shape[1], dim=1)
        qb = torch.nn.functional.pad(q.float(), (0, 0, 0, n_q * bq - Sq)).view(B, Hq, n_q, bq, D)
        q_pos = geo.q_first.view(-1, 1) + torch.arange(bq, device=q.device)  # [nQB, bq] (past Sq on the tail)
        valid_q = (q_pos - geo.offset) < Sq
        scale = 1.0 / math.sqrt(D)

        # anchors: exact max logit over the first kv block and the local window of every query
        band = geo.q_first.view(-1, 1) - self.local + 1 + torch.arange(bq + self.local - 1, device=q.device)
        band_k = kx[:, :, band.clamp(0, Skv - 1)]  # [B, Hq, nQB, W, D]
        d = q_pos.unsqueeze(-1) - band.unsqueeze(1)  # [nQB, bq, W]
        s_local = (qb @ band_k.transpose(-1, -2) * scale).masked_fill(~((d >= 0) & (d < self.local)), -math.inf)
        sink = torch.arange(min(bkv, Skv), device=q.device)
        s_sink = (qb @ kx[:, :, sink].transpose(-1, -2).unsqueeze(2) * scale).masked_fill(
            sink.view(1, 1, -1) > q_pos.unsqueeze(-1), -math.inf)
        anchor_q = torch.maximum(s_local.amax(-1), s_sink.amax(-1))  # finite: d = 0 is in the window
        anchor = (anchor_q * valid_q).sum(-1) / valid_q.sum(-1)  # [B, Hq, nQB]

        # stripes: block-mean logit of every key against the anchor
        pooled = (qb * valid_q.unsqueeze(-1)).sum(3) / valid_q.sum(-1, keepdim=True)
        est = pooled @ kx.transpose(-1, -2) * scale  # [B, Hq, nQB, Skv]
        stripes = est >= (anchor - self.theta).unsqueeze(-1)
        stripes &= torch.arange(Skv, device=q.device).view(1, -1) <= geo.q_last.view(-1, 1)
        pad = torch.nn.functional.pad(stripes, (0, n_kv * bkv - Skv))
        counts = pad.view(B, Hq, n_q, n_kv, bkv).sum(-1, dtype=torch.int32)  # kept stripes per block
        selected = counts > 0
        selected[..., 0] = True
        selected |= geo.window(torch.tensor(self.local, device=q.device))
        rule = _stripe_mask(stripes, counts, bq, bkv) | masks.sinks(bkv, self.local, offset=geo.offset)
        self.last_blocks = to_block_sparse(selected, geo, rule)
        return self.last_blocks


def _stripe_mask(stripes: Tensor, counts: Tensor, bq: int, bkv: int) -> MaskMod:
    """Key stripes per query block (``stripes`` bool [B, H, nQB, Skv]) as a mask whose block bounds come from
    the per-block stripe counts: a block with every stripe kept is settled whole instead of token by token."""
    n_q, n_kv = counts.shape[-2:]

    def fn(b, h, q_idx, kv_idx):
        return stripes[b, h, q_idx // bq, kv_idx]

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        i, j = q_lo // bq, kv_lo // bkv
        inside = (q_hi // bq == i) & (kv_hi // bkv == j)  # the rectangle lies in one method block
        n = counts[b, h, i.clamp(max=n_q - 1), j.clamp(max=n_kv - 1)]
        return ~inside | (n > 0), inside & (n == bkv)

    return MaskMod(fn, bounds=bounds, name="anchor_stripes")
