"""Masks for packed variable-length batches (cu_seqlens): documents never attend to each other."""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.masks.core import MaskFn, MaskMod, evaluate


def _doc_ids(cu: Tensor) -> Tensor:
    cu = cu.long()
    return torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), cu[1:] - cu[:-1])


def causal_per_sequence(cu_seqlens_q: Tensor, cu_seqlens_kv: Tensor) -> MaskMod:
    """Causal mask in sequence-local coordinates with ``b`` = sequence index, bottom-right aligned per
    sequence (offset = kv length - q length): the form BlockSparse.from_mask_mod(cu_seqlens=...) evaluates."""
    offset = ((cu_seqlens_kv[1:] - cu_seqlens_kv[:-1]) - (cu_seqlens_q[1:] - cu_seqlens_q[:-1])).long()
    cache: dict[torch.device, Tensor] = {}

    def causal_varlen(b, h, q, kv):
        off = cache.setdefault(q.device, offset.to(q.device))
        return kv <= q + off[b]

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        off = cache.setdefault(q_lo.device, offset.to(q_lo.device))[b]
        return kv_lo <= q_hi + off, kv_hi <= q_lo + off

    return MaskMod(causal_varlen, bounds=bounds, name="causal_varlen")


def packed(cu_seqlens_q: Tensor, cu_seqlens_kv: Tensor, *, causal: bool = False,
           inner: MaskFn | None = None) -> MaskMod:
    """The same mask over *global* packed indices (b = 0): same sequence, optional per-sequence causality,
    and ``inner`` evaluated with b = sequence index and sequence-local positions. For the reference and flex."""
    doc_q, doc_kv = _doc_ids(cu_seqlens_q), _doc_ids(cu_seqlens_kv)
    start_q, start_kv = cu_seqlens_q.long()[doc_q], cu_seqlens_kv.long()[doc_kv]
    local_causal = causal_per_sequence(cu_seqlens_q, cu_seqlens_kv) if causal else None
    cache: dict[torch.device, tuple[Tensor, ...]] = {}

    def packed_mask(b, h, q, kv):
        dq, dkv, sq, skv = cache.setdefault(q.device, tuple(t.to(q.device) for t in (doc_q, doc_kv, start_q, start_kv)))
        d, ql, kl = dq[q], q - sq[q], kv - skv[kv]
        m = d == dkv[kv]
        if local_causal is not None:
            m = m & local_causal(d, h, ql, kl)
        if inner is not None:
            m = m & evaluate(inner, d, h, ql, kl)
        return m

    return MaskMod(packed_mask, name="packed")
