"""The oracle: plain PyTorch attention computed in query chunks (memory O(seq_q_chunk × seq_kv)).

It accepts every mask kind the library knows (mask_mod, BlockSparse, causal flag, packed variable-length
sequences, low-rank additive bias), any dtype including float64, and autograd (each chunk is checkpointed, so
the backward also stays O(chunk × seq_kv)). It is the CPU execution path and the yardstick of every kernel.
"""

from __future__ import annotations

import bisect
import math

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from longattn.masks.block_sparse import BlockSparse
from longattn.masks.core import MaskMod, evaluate
from longattn.masks.varlen import packed

DEFAULT_CHUNK = 1024


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: MaskMod | BlockSparse | None = None,
    causal: bool = False,
    scale: float | None = None,
    bias: tuple[Tensor, Tensor] | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_kv: Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """Return (out [B, Hq, Sq, D] in q.dtype, lse [B, Hq, Sq] float32 or float64; -inf where nothing attended).

    ``compute_dtype`` defaults to float32 for half inputs (accurate CPU path); pass the input dtype to get
    "plain PyTorch in low precision", the baseline error the kernels are held to.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if compute_dtype is None:
        compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    row_mask = _row_mask_fn(mask, causal, B, Hq, Sq, Skv, cu_seqlens_q, cu_seqlens_kv, q.device)
    kx = k.repeat_interleave(group, dim=1) if group > 1 else k
    vx = v.repeat_interleave(group, dim=1) if group > 1 else v
    outs, lses = [], []
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, *(bias if bias is not None else ())))
    for lo, hi in _chunks(mask, Sq, chunk):
        allowed = row_mask(lo, hi)
        args = (q[:, :, lo:hi], kx, vx, allowed, scale, compute_dtype)
        if bias is not None:
            args = (*args, bias[0][:, :, lo:hi], bias[1])
        fn = _chunk_attention
        o, lse = checkpoint(fn, *args, use_reentrant=False) if needs_grad else fn(*args)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)


def _chunk_attention(q, k, v, allowed, scale, compute_dtype, bias_u=None, bias_v=None):
    s = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-1, -2)) * scale
    if bias_u is not None:
        s = s + torch.matmul(bias_u.to(compute_dtype), bias_v.to(compute_dtype).transpose(-1, -2))
    return softmax_attend(s, v.to(compute_dtype), allowed)


def softmax_attend(s: Tensor, v: Tensor, allowed: Tensor | None) -> tuple[Tensor, Tensor]:
    """softmax(s masked by ``allowed``) @ v and the row LSE; rows with nothing allowed give 0 and -inf."""
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v) / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse_dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    return out, (m + torch.log(denom)).squeeze(-1).to(lse_dtype)


def _chunks(mask, Sq: int, chunk: int) -> list[tuple[int, int]]:
    """Query ranges to process at once; with a BlockSparse they follow its (possibly ragged) query blocks."""
    if not isinstance(mask, BlockSparse):
        return [(lo, min(Sq, lo + chunk)) for lo in range(0, Sq, chunk)]
    starts = mask.q_blocks.starts.tolist()
    per = max(1, chunk // mask.block_size[0])
    bounds = starts[::per] + [Sq]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _row_mask_fn(mask, causal, B, H, Sq, Skv, cu_q, cu_kv, device):
    """A function (lo, hi) -> bool mask broadcastable to [B, H, hi - lo, Skv], or None for all-True."""
    kv = torch.arange(Skv, device=device)
    if cu_q is not None or cu_kv is not None:
        if isinstance(mask, BlockSparse):
            raise ValueError("mask: a BlockSparse built with cu_seqlens already encodes them; do not pass both")
        cu_q = (cu_kv if cu_q is None else cu_q).to(device)
        cu_kv = (cu_q if cu_kv is None else cu_kv).to(device)
        mask, causal = packed(cu_q, cu_kv, causal=causal, inner=mask), False

    if mask is None and not causal:
        return lambda lo, hi: None

    def rows(lo, hi):
        m = None
        if causal:
            q_pos = torch.arange(lo, hi, device=device).view(-1, 1) + (Skv - Sq)
            m = (kv.view(1, -1) <= q_pos).view(1, 1, hi - lo, Skv)
        if isinstance(mask, BlockSparse):
            starts = mask.q_blocks.starts.tolist()
            el = mask.dense_rows(starts.index(lo), bisect.bisect_left(starts, hi))
            m = el if m is None else m & el
        elif mask is not None:
            el = evaluate(mask, torch.arange(B, device=device).view(-1, 1, 1, 1),
                          torch.arange(H, device=device).view(1, -1, 1, 1),
                          torch.arange(lo, hi, device=device).view(1, 1, -1, 1), kv.view(1, 1, 1, -1))
            m = el if m is None else m & el
        return m

    return rows
