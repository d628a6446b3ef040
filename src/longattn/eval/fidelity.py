"""Attention fidelity per layer and head on a model's real q/k/v: how much of dense attention's probability mass a
method's blocks keep (mass recall) and how far its output moves (relative error), while the forward itself stays
dense so every layer sees the same inputs as in the unpatched model."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longattn.eval.methods import MethodSpec, applied

FIDELITY_NAME = "longattn_fidelity"


def head_fidelity(q: Tensor, k: Tensor, v: Tensor, blocks, sparse_out: Tensor, scale: float,
                  chunk_blocks: int = 4) -> tuple[Tensor, Tensor]:
    """(mass recall [Hq], output relative error [Hq]) for batch 0: dense causal softmax in query chunks aligned to
    the BlockSparse's query blocks, so memory stays O(chunk × Skv)."""
    Hq, Sq, _ = q.shape[1:]
    Skv = k.shape[2]
    g = Hq // k.shape[1]
    kk = k[0].repeat_interleave(g, 0).float()
    vv = v[0].repeat_interleave(g, 0).float()
    bq = blocks.q_blocks.block
    recall = torch.zeros(Hq, dtype=torch.float64, device=q.device)
    err2 = torch.zeros_like(recall)
    ref2 = torch.zeros_like(recall)
    for lo in range(0, math.ceil(Sq / bq), chunk_blocks):
        hi = min(lo + chunk_blocks, math.ceil(Sq / bq))
        rows = torch.arange(lo * bq, min(hi * bq, Sq), device=q.device)
        s = q[0, :, rows].float() @ kk.transpose(-1, -2) * scale
        s = s.masked_fill(torch.arange(Skv, device=q.device) > rows.view(-1, 1) + (Skv - Sq), float("-inf"))
        p = torch.softmax(s, -1)
        kept = blocks.dense_rows(lo, hi)[0].to(q.device)  # [H' (1 or Hq), rows, Skv]
        recall += (p * kept).sum(-1).sum(-1).double()
        dense = p @ vv
        err2 += ((sparse_out[0, :, rows].float() - dense) ** 2).sum((-1, -2)).double()
        ref2 += (dense ** 2).sum((-1, -2)).double()
    return recall / Sq, (err2 / ref2.clamp_min(1e-30)).sqrt()


def measure(model, ids: Tensor, spec: MethodSpec, impl: str = "auto") -> list[dict]:
    """One row per (layer, head) for ``spec`` on the prompt ``ids`` (batch 1)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from longattn.hf.patch import longattn_attention_forward

    rows: list[dict] = []

    def fidelity_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        sparse, _ = longattn_attention_forward(module, query, key, value, None, scaling=scale, **kwargs)
        dense = torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(query.shape[1] // key.shape[1], 1),
            value.repeat_interleave(query.shape[1] // key.shape[1], 1), is_causal=True, scale=scale)
        state = _state_of(module)
        recall, err = head_fidelity(query, key, value, state.last_blocks, sparse.transpose(1, 2), scale)
        density = state.densities[-1]
        for h in range(query.shape[1]):
            rows.append({"layer": getattr(module, "layer_idx", 0), "head": h, "mass_recall": float(recall[h]),
                         "out_rel_err": float(err[h]), "density": density})
        return dense.transpose(1, 2).contiguous(), None

    if spec.family not in ("pattern", "prefill"):
        raise ValueError(f"method: fidelity measures prefill patterns and methods, got {spec.label!r} "
                         f"({spec.family})")
    AttentionInterface.register(FIDELITY_NAME, fidelity_forward)
    AttentionMaskInterface.register(FIDELITY_NAME, sdpa_mask)
    with applied(model, spec, impl):
        for m in model.modules():
            if hasattr(m, "config"):
                m.config._attn_implementation = FIDELITY_NAME
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)
    return rows


def _state_of(module):
    from longattn.hf.patch import _states

    return _states[id(module.config)]
