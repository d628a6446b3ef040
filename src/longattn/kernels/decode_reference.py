"""The decode oracle: plain PyTorch attention of a few query tokens against a dense, paged or page-selected cache.

It gathers the logical cache of each sequence, builds the token mask (valid length, causal among the Tq queries,
selected pages) and calls the same masked-softmax epilogue as the prefill reference. It is the CPU execution path
of ``decode_attention`` and the yardstick of the Triton decode kernel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longattn.kernels.reference import softmax_attend


def logical_cache(cache: Tensor, block_table: Tensor | None) -> Tensor:
    """[B, Hkv, L, D] tokens in logical order: the cache itself, or the pages ``block_table`` points at."""
    if block_table is None:
        return cache
    pages = cache[block_table.long()]  # [B, max_pages, Hkv, page_size, D]
    B, P, H, ps, D = pages.shape
    return pages.permute(0, 2, 1, 3, 4).reshape(B, H, P * ps, D)


def allowed_tokens(lengths: Tensor, n_tokens: int, tq: int, hkv: int, page_size: int | None,
                   page_indices: Tensor | None, page_counts: Tensor | None) -> Tensor:
    """bool [B, H, Tq, L] (H = Hkv, or the selection's heads: Hq for one set per query head): query i of sequence
    b sees token j iff j < len_b - Tq + i + 1 (lengths [B], or [B, Hkv] per kv head; and j's page is among the
    first page_counts[b, h] entries of page_indices[b, h] when a selection is given)."""
    device = lengths.device
    pos = torch.arange(n_tokens, device=device)
    lens = lengths.view(lengths.shape[0], -1, 1, 1).long()  # [B, 1 or Hkv, 1, 1]
    limit = lens - tq + torch.arange(tq, device=device).view(1, 1, -1, 1)
    allowed = (pos.view(1, 1, 1, -1) <= limit).expand(-1, hkv, -1, -1)
    if page_indices is None:
        return allowed
    heads = page_indices.shape[1]
    allowed = allowed.repeat_interleave(heads // hkv, 1)  # a kv head's lengths hold for its query heads
    chosen = selected_pages(page_indices, page_counts, math.ceil(n_tokens / page_size))
    return allowed & chosen[:, :, pos // page_size].unsqueeze(2)


def selected_pages(page_indices: Tensor, page_counts: Tensor, n_pages: int) -> Tensor:
    """bool [B, H, n_pages]: the pages among the first page_counts[b, h] entries of page_indices[b, h]."""
    B, H, n_sel = page_indices.shape
    used = torch.arange(n_sel, device=page_indices.device).view(1, 1, -1) < page_counts.view(B, H, 1).long()
    idx = torch.where(used, page_indices.long(), n_pages)  # unused entries land in a dropped extra page
    chosen = torch.zeros(B, H, n_pages + 1, dtype=torch.bool, device=page_indices.device)
    return chosen.scatter_(2, idx, True)[..., :n_pages]


def decode_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, *, cache_seqlens: Tensor | None = None,
                     block_table: Tensor | None = None, page_size: int | None = None,
                     page_indices: Tensor | None = None, page_counts: Tensor | None = None,
                     scale: float | None = None, compute_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(out [B, Hq, Tq, D] in q.dtype, lse [B, Hq, Tq]; -inf and 0 output where a query sees nothing).

    Inputs are trusted (``decode_attention`` validates them). ``compute_dtype`` defaults to float32 for half
    inputs; pass q.dtype for the plain low-precision baseline of the tolerance rule.
    """
    B, Hq, Tq, D = q.shape
    k, v = logical_cache(k_cache, block_table), logical_cache(v_cache, block_table)
    Hkv, L = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if page_size is None and block_table is not None:
        page_size = k_cache.shape[2]
    if cache_seqlens is None:
        cache_seqlens = torch.full((B,), L, dtype=torch.int64, device=q.device)
    if compute_dtype is None:
        compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    allowed = allowed_tokens(cache_seqlens.to(q.device), L, Tq, Hkv, page_size, page_indices, page_counts)
    qg = q.reshape(B, Hkv, G * Tq, D).to(compute_dtype)  # the group's heads share one K/V read
    s = torch.matmul(qg, k.to(compute_dtype).transpose(-1, -2)) * scale
    if allowed.shape[1] == Hkv:  # one set per kv head: its query heads share it
        allowed = allowed.unsqueeze(2).expand(-1, -1, G, -1, -1)
    allowed = allowed.reshape(B, Hkv, G * Tq, L)
    out, lse = softmax_attend(s, v.to(compute_dtype), allowed)
    return out.reshape(B, Hq, Tq, D).to(q.dtype), lse.reshape(B, Hq, Tq)
