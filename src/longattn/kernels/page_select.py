"""Query-aware page selection for decoding (Quest-style): per-page key bounds, upper-bound scores, top-k pages.

``page_bounds`` keeps the element-wise min and max key of each page; ``page_scores`` (Triton, or torch on CPU)
bounds q·k over a page by sum_d max(q_d·min_d, q_d·max_d), reduced over the query heads of a kv group (or one row
per query head: Quest's own form);
``select_pages`` turns the scores into the ``page_indices`` / ``page_counts`` that ``decode_attention`` reads.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from longattn.kernels.decode_checks import check_page_size
from longattn.kernels.decode_reference import logical_cache

REDUCTIONS = ("max", "sum", "none")


def page_bounds(k_cache: Tensor, page_size: int, *, cache_seqlens: Tensor | None = None,
                block_table: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(min, max) keys per logical page, each [B, Hkv, n_pages, D]; tokens past a sequence's length are ignored
    (a page with no valid token gets zeros: ``select_pages`` given the lengths never picks it)."""
    page_size = check_page_size(page_size)
    if block_table is not None and k_cache.shape[2] != page_size:
        raise ValueError(f"page_size: got {page_size}, but the paged cache holds pages of {k_cache.shape[2]}")
    k = logical_cache(k_cache, block_table)
    B, H, L, D = k.shape
    n_pages = -(-L // page_size)
    if n_pages * page_size != L:
        k = torch.nn.functional.pad(k, (0, 0, 0, n_pages * page_size - L))
    k = k.view(B, H, n_pages, page_size, D)
    lengths = torch.full((B,), L, device=k.device) if cache_seqlens is None else cache_seqlens
    valid = (torch.arange(n_pages * page_size, device=k.device).view(1, -1) < lengths.view(-1, 1).long())
    valid = valid.view(B, 1, n_pages, page_size, 1)
    big = torch.tensor(float("inf"), dtype=k.dtype, device=k.device)
    lo, hi = torch.where(valid, k, big).amin(3), torch.where(valid, k, -big).amax(3)
    empty = ~valid.any(3)
    return lo.masked_fill(empty, 0), hi.masked_fill(empty, 0)


@triton.jit
def _page_scores_kernel(Q, MN, MX, OUT, n_pages, ROWS, SUM: tl.constexpr, EACH: tl.constexpr,
                        BLOCK_P: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One (batch · kv head, block of pages): loop over the group's query rows, reduce their bounds (EACH: store
    every row's own)."""
    bh = tl.program_id(0)
    pages = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    dims = tl.arange(0, HEAD_DIM)
    ok = pages < n_pages
    off = (bh.to(tl.int64) * n_pages + pages[:, None]) * HEAD_DIM + dims[None, :]
    mn = tl.load(MN + off, mask=ok[:, None], other=0.0).to(tl.float32)
    mx = tl.load(MX + off, mask=ok[:, None], other=0.0).to(tl.float32)
    best = tl.zeros([BLOCK_P], tl.float32) if SUM else tl.full([BLOCK_P], float("-inf"), tl.float32)
    for r in range(ROWS):
        q = tl.load(Q + (bh.to(tl.int64) * ROWS + r) * HEAD_DIM + dims).to(tl.float32)
        bound = tl.sum(tl.maximum(q[None, :] * mn, q[None, :] * mx), 1)
        if EACH:
            tl.store(OUT + (bh.to(tl.int64) * ROWS + r) * n_pages + pages, bound, mask=ok)
        best = best + bound if SUM else tl.maximum(best, bound)
    if not EACH:
        tl.store(OUT + bh.to(tl.int64) * n_pages + pages, best, mask=ok)


def page_scores_reference(q: Tensor, page_min: Tensor, page_max: Tensor, reduce: str = "max") -> Tensor:
    """Torch version of ``page_scores`` (float32): the CPU path and the kernel's oracle."""
    B, Hq, Tq, D = q.shape
    Hkv = page_min.shape[1]
    qg = q.float().reshape(B, Hkv, (Hq // Hkv) * Tq, 1, D)
    bound = torch.maximum(qg * page_min.float().unsqueeze(2), qg * page_max.float().unsqueeze(2)).sum(-1)
    if reduce == "none":
        return bound.reshape(B, Hq * Tq, -1)
    return bound.amax(2) if reduce == "max" else bound.sum(2)


def page_scores(q: Tensor, page_min: Tensor, page_max: Tensor, *, reduce: str = "max",
                impl: str = "auto") -> Tensor:
    """Quest upper bound of q·k per page, [B, Hkv, n_pages] float32, reduced (max or sum) over the group's query
    heads and query tokens; ``reduce="none"``: one row per (query head, query token), [B, Hq·Tq, n_pages].
    q: [B, Hq, Tq, D] (or [B, Hq, D]); page_min/page_max: [B, Hkv, n_pages, D]."""
    if q.dim() == 3:
        q = q.unsqueeze(2)
    if q.dim() != 4 or page_min.dim() != 4 or page_min.shape != page_max.shape:
        raise ValueError(f"q/page_min/page_max: got shapes {tuple(q.shape)}, {tuple(page_min.shape)}, "
                         f"{tuple(page_max.shape)}; expected [B, Hq, Tq, D] and two equal [B, Hkv, n_pages, D]")
    B, Hq, Tq, D = q.shape
    if page_min.shape[0] != B or page_min.shape[3] != D or Hq % page_min.shape[1]:
        raise ValueError(f"page_min: shape {tuple(page_min.shape)} does not fit q {tuple(q.shape)} (same batch "
                         "and head_dim, q heads a multiple of kv heads)")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce: got {reduce!r}, expected one of {REDUCTIONS}")
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl: got {impl!r}, expected 'auto', 'triton' or 'reference'")
    use_triton = impl == "triton" or (impl == "auto" and q.device.type == "cuda")
    if use_triton and q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"impl='triton': tensors are on {q.device}; the Triton kernel needs CUDA")
    if not use_triton or D & (D - 1):
        return page_scores_reference(q, page_min, page_max, reduce)
    Hkv, n_pages = page_min.shape[1], page_min.shape[2]
    out = torch.empty(B, Hq * Tq if reduce == "none" else Hkv, n_pages, dtype=torch.float32, device=q.device)
    block_p = 32 if D <= 64 else 16
    grid = (B * Hkv, triton.cdiv(n_pages, block_p))
    _page_scores_kernel[grid](q.contiguous(), page_min.contiguous(), page_max.contiguous(), out, n_pages,
                              (Hq // Hkv) * Tq, SUM=reduce == "sum", EACH=reduce == "none", BLOCK_P=block_p,
                              HEAD_DIM=D)
    return out


def select_pages(scores: Tensor, budget_tokens: int, page_size: int, *, cache_seqlens: Tensor | None = None,
                 always: tuple[int, int] = (1, 1)) -> tuple[Tensor, Tensor]:
    """Top pages by score within ``budget_tokens`` → (page_indices int32 [B, Hkv, n_sel] ascending, page_counts
    int32 [B, Hkv]). ``always = (sinks, recent)``: the first and the last (current) pages of each sequence are
    always kept. Pages past a sequence's length are never chosen."""
    page_size = check_page_size(page_size)
    if scores.dim() != 3:
        raise ValueError(f"scores: got shape {tuple(scores.shape)}, expected [B, Hkv, n_pages]")
    B, H, n_pages = scores.shape
    context = n_pages * page_size
    if isinstance(budget_tokens, bool) or not isinstance(budget_tokens, int):
        raise TypeError(f"budget_tokens: got {type(budget_tokens).__name__}, expected an int")
    if budget_tokens <= 0 or budget_tokens > context:
        raise ValueError(f"budget_tokens: got {budget_tokens}; expected 1 .. {context} (the context: {n_pages} "
                         f"pages of {page_size} tokens)")
    sinks, recent = always
    if sinks < 0 or recent < 0:
        raise ValueError(f"always: got {always}, expected two non-negative page counts (sinks, recent)")
    n_sel = budget_tokens // page_size
    if n_sel < min(sinks + recent, n_pages) or n_sel == 0:
        raise ValueError(f"budget_tokens: {budget_tokens} tokens is {n_sel} pages of {page_size}; at least "
                         f"{max(1, min(sinks + recent, n_pages))} needed for the always-kept pages {always}")
    dev = scores.device
    if cache_seqlens is None:
        n_valid = torch.full((B,), n_pages, dtype=torch.int64, device=dev)
    else:
        n_valid = (cache_seqlens.long() + page_size - 1) // page_size
    page = torch.arange(n_pages, device=dev).view(1, 1, -1)
    valid = page < n_valid.view(-1, 1, 1)
    forced = (page < sinks) | (page >= n_valid.view(-1, 1, 1) - recent)
    key = scores.float().masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
    top = key.topk(n_sel, dim=-1).indices
    chosen = torch.gather(valid.expand(B, H, -1), 2, top)
    idx = torch.where(chosen, top, torch.full_like(top, n_pages)).sort(-1).values  # unused slots sort last
    counts = chosen.sum(-1).to(torch.int32)
    return torch.where(idx == n_pages, 0, idx).to(torch.int32), counts
