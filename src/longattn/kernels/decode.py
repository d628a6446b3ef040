"""Triton decode attention (flash-decoding): a few query tokens against a dense, paged or page-selected KV cache.

Grid (batch, kv head, split): each program walks its share of the cache in tiles, loads each K/V tile once and
scores all G = Hq / Hkv query heads × Tq queries of the group against it with one dot, keeping an online softmax.
It writes a partial (out, lse); a second small kernel merges the splits by their LSE. With a single split the
first kernel writes the final output itself. Pages are ``page_size`` consecutive logical tokens; a tile of a page
of 16 tokens or more never crosses it, so its load is contiguous even when pages are scattered (block_table) or
selected; smaller pages (Quest's 8-token pages) are gathered whole into 16- to 64-token tiles.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from longattn.kernels.decode_checks import check_decode_inputs
from longattn.kernels.decode_reference import decode_reference

log = logging.getLogger("longattn")
LOG2E = 1.4426950408889634
IMPLS = ("auto", "triton", "reference")
DENSE_UNIT = 128  # tokens per split unit on an unselected contiguous cache (a "virtual page")
# split count: the H100 sweep (benchmarks/NOTES-decode.md) picked the fewest programs that still cover the SMs
PROGRAMS_PER_SM = 2  # split programs per SM to aim for
MIN_SPLIT_TOKENS = 512  # fewer tokens than this per program and the merge costs more than the parallelism gains
MIN_SPLIT_TOKENS_SELECTED = 256  # selected pages: the sweep's best at 4k of 128k, batch 1
MAX_HEAD_SET_GROUP = 31  # per-query-head selections: one bit per query head of a group in an int32 word
MERGE_ELEMENTS = 8192  # partial-output elements (splits × rows × head_dim) one merge step loads at once
_logged: set[str] = set()


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _configs() -> list[triton.Config]:
    """(tile tokens, warps, stages) candidates; the interpreter gets one small tile."""
    if _interpret():
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # all compile for sm_90 without spills (benchmarks/NOTES-decode.md); (32, 4, 4) serves 32-token pages
    sizes = [(64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 8, 3), (32, 4, 4)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in sizes]


def _prune(configs, named_args, **kwargs):
    """Pages of at least 16 tokens: tiles within a page (sizes dividing it; all are powers of two), each tile one
    contiguous load. Smaller pages: tiles of up to 64 tokens gathering whole pages (a dot needs 16 rows)."""
    page = {**named_args, **kwargs}["PAGE"]
    if page < 16:
        return [c for c in configs if c.kwargs["BLOCK_N"] <= 64]
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= page]
    return kept or [triton.Config({"BLOCK_N": page}, num_warps=4, num_stages=2)]


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "BLOCK_M", "PAGE", "PAGED", "SELECTED", "HEAD_SETS", "DIRECT",
                                                 "work_bucket"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _decode_split_kernel(
    Q, K, V, LENS, BT, PIDX, PCNT, PBITS, OUT, LSE,
    qk_scale, units_per_split, n_splits,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_bt, n_sel, HKV, capacity, work_bucket,
    HAS_LENS: tl.constexpr, LENS_PER_HEAD: tl.constexpr, TQ: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, PAGED: tl.constexpr, SELECTED: tl.constexpr, HEAD_SETS: tl.constexpr,
    DIRECT: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One (batch, kv head, split): online softmax over its tiles; writes normalised out and natural-log LSE
    (no LENS: every sequence fills the cache's ``capacity``; LENS_PER_HEAD: one length per (batch, kv head);
    HEAD_SETS: the selected pages are the union of the group's per-query-head sets, PBITS saying whose each is).
    ``work_bucket`` (tokens per program, coarsely) only keys the autotuner: short and long programs tune apart."""
    if PDL:  # let the merge kernel be scheduled now; it waits (griddepcontrol.wait) for this grid to finish
        tl.extra.cuda.gdc_launch_dependents()
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    SUB: tl.constexpr = PAGE < BLOCK_N  # pages smaller than a tile: a tile gathers PPT whole pages
    TPP: tl.constexpr = PAGE // BLOCK_N  # tiles per page (pages at least a tile)
    PPT: tl.constexpr = BLOCK_N // PAGE  # pages per tile (SUB)
    length = tl.load(LENS + (pid_bh if LENS_PER_HEAD else b)) if HAS_LENS else capacity
    n_units = tl.load(PCNT + pid_bh) if SELECTED else tl.cdiv(length, PAGE)
    unit_lo = split * units_per_split
    unit_hi = tl.minimum(unit_lo + units_per_split, n_units)
    if SUB:  # a split's first and last tiles may hold pages of its neighbours: masked per column below
        tile_lo = unit_lo // PPT
        tile_hi = tl.cdiv(unit_hi, PPT)
    else:
        tile_lo = unit_lo * TPP
        tile_hi = unit_hi * TPP
    if not SELECTED:
        tile_hi = tl.minimum(tile_hi, tl.cdiv(length, BLOCK_N))

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < ROWS
    q_ptrs = Q + (pid_bh.to(tl.int64) * ROWS + rows[:, None]) * HEAD_DIM + dims[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    limit = length - TQ + (rows % TQ)  # query row r (= head g · TQ + t) sees tokens <= len - TQ + t

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_head = K + h.to(tl.int64) * stride_kh
    v_head = V + h.to(tl.int64) * stride_vh
    head = tl.minimum(rows // TQ, 31)  # the row's query head within the group (HEAD_SETS bit)
    for tile in range(tile_lo, tile_hi):
        if SUB:  # column c holds token c % PAGE of unit tile · PPT + c // PAGE
            unit = tile * PPT + cols // PAGE
            mine = (unit >= unit_lo) & (unit < unit_hi)
            page = tl.load(PIDX + pid_bh.to(tl.int64) * n_sel + unit, mask=mine, other=0).to(tl.int64) \
                if SELECTED else unit.to(tl.int64)
            pos = tl.where(mine, page * PAGE + cols % PAGE, 2147483647)  # columns not ours are never seen
            in_page = cols % PAGE
        else:
            unit = tile // TPP
            page = tl.load(PIDX + pid_bh.to(tl.int64) * n_sel + unit).to(tl.int64) if SELECTED \
                else unit.to(tl.int64)
            in_page = (tile % TPP) * BLOCK_N + cols
            pos = page * PAGE + in_page  # logical positions of the tile's tokens
        if PAGED:
            if SUB:
                phys = tl.load(BT + b.to(tl.int64) * stride_bt + page, mask=mine, other=0).to(tl.int64)
            else:
                phys = tl.load(BT + b.to(tl.int64) * stride_bt + page).to(tl.int64)
            tok = phys * stride_kb + in_page * stride_ks
            tok_v = phys * stride_vb + in_page * stride_vs
        else:
            tok = b.to(tl.int64) * stride_kb + pos * stride_ks
            tok_v = b.to(tl.int64) * stride_vb + pos * stride_vs
        in_len = pos < length
        k = tl.load(k_head + tok[:, None] + dims[None, :], mask=in_len[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # scale · log2(e): scores in base 2
        seen_ok = pos[None, :] <= limit[:, None]
        if HEAD_SETS:  # bit g of the page's word: query head g of the group selected it
            if SUB:
                bits = tl.load(PBITS + pid_bh.to(tl.int64) * n_sel + unit, mask=mine, other=0)
                seen_ok = seen_ok & (((bits[None, :] >> head[:, None]) & 1) != 0)
            else:
                bits = tl.load(PBITS + pid_bh.to(tl.int64) * n_sel + unit)
                seen_ok = seen_ok & (((bits >> head) & 1) != 0)[:, None]
        s = tl.where(seen_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + tok_v[:, None] + dims[None, :], mask=in_len[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    if DIRECT:  # one split: final output in the input dtype, [B, Hkv, G·Tq, D] = [B, Hq, Tq, D]
        o_ptrs = OUT + (pid_bh.to(tl.int64) * ROWS + rows[:, None]) * HEAD_DIM + dims[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + pid_bh.to(tl.int64) * ROWS + rows, lse, mask=row_ok)
    else:  # partials [B·Hkv, splits, ROWS, D] and [B·Hkv, splits, ROWS], float32
        base = (pid_bh.to(tl.int64) * n_splits + split) * ROWS
        tl.store(OUT + (base + rows[:, None]) * HEAD_DIM + dims[None, :], out, mask=row_ok[:, None])
        tl.store(LSE + base + rows, lse, mask=row_ok)


@triton.jit
def _merge_kernel(PO, PL, OUT, LSE, n_splits, ROWS: tl.constexpr, ROWS_P2: tl.constexpr, MERGE_S: tl.constexpr,
                  HEAD_DIM: tl.constexpr, PDL: tl.constexpr):
    """One (batch, kv head): combine its n_splits partial (out, lse) in one pass, MERGE_S splits × all rows per
    load, weighted by exp(lse_s - running max); write the final out [ROWS, D] (OUT's dtype) and lse [ROWS]."""
    if PDL:  # launched early (programmatic dependent launch): wait until the split kernel's writes are visible
        tl.extra.cuda.gdc_wait()
    bh = tl.program_id(0)
    r = tl.arange(0, ROWS_P2)
    d = tl.arange(0, HEAD_DIM)
    r_ok = r < ROWS
    base = bh.to(tl.int64) * n_splits * ROWS
    m = tl.full([ROWS_P2], float("-inf"), tl.float32)
    total = tl.zeros([ROWS_P2], tl.float32)
    acc = tl.zeros([ROWS_P2, HEAD_DIM], tl.float32)
    for s0 in range(0, n_splits, MERGE_S):
        s = s0 + tl.arange(0, MERGE_S)
        ok = (s < n_splits)[:, None] & r_ok[None, :]
        idx = base + s[:, None] * ROWS + r[None, :]  # [MERGE_S, ROWS_P2]
        lse_s = tl.load(PL + idx, mask=ok, other=float("-inf"), cache_modifier=".cg")  # read once: skip L1
        o = tl.load(PO + idx[:, :, None] * HEAD_DIM + d[None, None, :], mask=ok[:, :, None], other=0.0,
                    cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse_s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse_s - m_safe[None, :])
        total = total * alpha + tl.sum(w, 0)
        acc = acc * alpha[:, None] + tl.sum(o * w[:, :, None], 0)
        m = m_new
    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(OUT + (bh.to(tl.int64) * ROWS + r[:, None]) * HEAD_DIM + d[None, :], out.to(OUT.dtype.element_ty),
             mask=r_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * ROWS + r, lse, mask=r_ok)


_SM_COUNT: dict[int, int] = {}
_PDL_OK: dict[int, bool] = {}


def _use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch of the merge (Hopper and newer): hides its launch behind the split kernel's
    tail. LONGATTN_DECODE_PDL=0 turns it off."""
    if device.type != "cuda" or _interpret() or os.environ.get("LONGATTN_DECODE_PDL", "1") == "0":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PDL_OK:
        _PDL_OK[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _PDL_OK[idx]


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Output allocation (tests replace it with a NaN fill to catch anything the kernels leave unwritten)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def choose_splits(batch_heads: int, n_units: int, unit_tokens: int, sm_count: int,
                  min_tokens: int = MIN_SPLIT_TOKENS) -> tuple[int, int]:
    """(splits, units per split): about PROGRAMS_PER_SM programs per SM, but never fewer than ``min_tokens`` each
    (the merge pass grows with the split count: benchmarks/NOTES-decode.md)."""
    by_sm = max(1, PROGRAMS_PER_SM * sm_count // batch_heads)
    by_work = max(1, n_units * unit_tokens // min_tokens)
    splits = max(1, min(by_sm, by_work, n_units))
    per = max(1, math.ceil(n_units / splits))
    return math.ceil(max(n_units, 1) / per), per


def _work_bucket(tokens_per_program: int) -> int:
    """0: < 1k tokens per program, 1: < 4k, 2: < 16k, 3: more."""
    return sum(tokens_per_program >= t for t in (1024, 4096, 16384))


def decode_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor | None, block_table: Tensor | None,
                  page_size: int | None, page_indices: Tensor | None, page_counts: Tensor | None, scale: float,
                  splits: int | None = None) -> tuple[Tensor, Tensor]:
    """Launch the split kernel (+ merge); inputs already validated; ``lengths`` [B] or [B, Hkv] (contiguous), None:
    every sequence is as long as the cache holds; a selection per kv head ([B, Hkv, n]) or per query head
    ([B, Hq, n], read as the group's union). ``splits`` overrides the heuristic (tests, sweeps)."""
    B, Hq, Tq, D = q.shape
    Hkv = k_cache.shape[1]
    rows = (Hq // Hkv) * Tq
    q = q.contiguous()
    paged, selected = block_table is not None, page_indices is not None
    head_sets = selected and page_indices.shape[1] != Hkv
    page_bits = None
    if head_sets:
        n_pages = block_table.shape[1] if paged else math.ceil(k_cache.shape[2] / page_size)
        page_indices, page_counts, page_bits = group_page_union(page_indices, page_counts, Hq // Hkv, n_pages)
    page = page_size if (paged or selected) else DENSE_UNIT
    if selected:
        n_units = page_indices.shape[2]
    elif paged:
        n_units = block_table.shape[1]
    else:
        n_units = math.ceil(k_cache.shape[2] / page)
    capacity = block_table.shape[1] * page if paged else k_cache.shape[2]
    if splits is None:
        min_tokens = MIN_SPLIT_TOKENS_SELECTED if selected else MIN_SPLIT_TOKENS
        splits, per = choose_splits(B * Hkv, n_units, page, _sm_count(q.device), min_tokens)
    else:
        per = max(1, math.ceil(n_units / splits))
    out = _empty(B, Hq, Tq, D, dtype=q.dtype, device=q.device)
    lse = _empty(B, Hq, Tq, dtype=torch.float32, device=q.device)
    direct = splits == 1
    if direct:
        p_out, p_lse = out, lse
    else:
        p_out = _empty(B * Hkv, splits, rows, D, dtype=torch.float32, device=q.device)
        p_lse = _empty(B * Hkv, splits, rows, dtype=torch.float32, device=q.device)
    dummy = q  # pointer arguments a launch does not use
    bt = block_table if paged else dummy
    pidx = page_indices.contiguous() if selected else dummy
    pcnt = page_counts.contiguous() if selected else dummy
    pbits = page_bits if head_sets else dummy
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    pdl = not direct and _use_pdl(q.device)
    _decode_split_kernel[(B * Hkv, splits)](
        q, k_cache, v_cache, dummy if lengths is None else lengths, bt, pidx, pcnt, pbits, p_out, p_lse,
        scale * LOG2E, per, splits,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bt.stride(0) if paged else 0, page_indices.shape[2] if selected else 0, Hkv, capacity,
        _work_bucket(per * page), HAS_LENS=lengths is not None,
        LENS_PER_HEAD=lengths is not None and lengths.dim() == 2, TQ=Tq, ROWS=rows,
        BLOCK_M=max(16, triton.next_power_of_2(rows)), HEAD_DIM=D, PAGE=page, PAGED=paged, SELECTED=selected,
        HEAD_SETS=head_sets, DIRECT=direct, PREC=prec, PDL=pdl,
    )
    if not direct:
        rows_p2 = triton.next_power_of_2(rows)
        _merge_kernel[(B * Hkv,)](p_out, p_lse, out, lse, splits, ROWS=rows, ROWS_P2=rows_p2,
                                  MERGE_S=max(1, MERGE_ELEMENTS // (rows_p2 * D)), HEAD_DIM=D, PDL=pdl,
                                  launch_pdl=pdl)
    return out, lse


@triton.jit
def _page_union_kernel(PIDX, PCNT, BITMAP, UNION, UBITS, UCOUNT, n_sel, n_pages, width,
                       G: tl.constexpr, SEL_P2: tl.constexpr, BLOCK: tl.constexpr):
    """One (batch, kv head): OR each query head's bit into a zeroed page bitmap, then compact the marked pages in
    ascending order (page numbers, their bits, how many)."""
    bh = tl.program_id(0)
    bitmap = BITMAP + bh.to(tl.int64) * n_pages
    e = tl.arange(0, SEL_P2)
    for g in tl.static_range(G):
        head = bh.to(tl.int64) * G + g  # query head (b, kv head · G + g) of the [B, Hq] selection
        used = e < tl.minimum(tl.load(PCNT + head), n_sel)
        pages = tl.load(PIDX + head * n_sel + e, mask=used, other=0)
        used = used & (pages >= 0) & (pages < n_pages)  # never written outside the bitmap, even unvalidated
        tl.atomic_or(bitmap + pages, tl.full([SEL_P2], 1 << g, tl.int32), mask=used)
    tl.debug_barrier()  # the block's atomics are visible to its own loads below
    total = 0
    for p0 in range(0, n_pages, BLOCK):
        page = p0 + tl.arange(0, BLOCK)
        bits = tl.load(bitmap + page, mask=page < n_pages, other=0, cache_modifier=".cg")
        keep = bits != 0
        slot = bh.to(tl.int64) * width + total + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(UNION + slot, page, mask=keep)
        tl.store(UBITS + slot, bits, mask=keep)
        total += tl.sum(keep.to(tl.int32), 0)
    tl.store(UCOUNT + bh, total)


def group_page_union(page_indices: Tensor, page_counts: Tensor, group: int,
                     n_pages: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-query-head page sets [B, Hq, n] (first counts [B, Hq] used; pages < n_pages) as one list per kv head:
    (pages [B, Hkv, w] int32 ascending, the first counts [B, Hkv] used; counts; bits [B, Hkv, w] int32, bit g set
    where query head g of the group selected the page), w = min(group · n, n_pages). The decode kernel then loads
    each page once for the whole group. One Triton launch and a zeroed bitmap, no host wait: it runs inside a
    captured decode step."""
    B, Hq, n = page_indices.shape
    if group > MAX_HEAD_SET_GROUP:
        raise ValueError(f"page_indices: one page set per query head needs at most {MAX_HEAD_SET_GROUP} query "
                         f"heads per kv head (one bit each), got {group}; pass one set per kv head")
    Hkv, width, device = Hq // group, max(1, min(group * n, n_pages)), page_indices.device
    bitmap = torch.zeros(B * Hkv, n_pages, dtype=torch.int32, device=device)
    union = _empty(B, Hkv, width, dtype=torch.int32, device=device)
    bits = _empty(B, Hkv, width, dtype=torch.int32, device=device)
    counts = _empty(B, Hkv, dtype=torch.int32, device=device)
    _page_union_kernel[(B * Hkv,)](page_indices.contiguous(), page_counts.contiguous(), bitmap, union, bits, counts,
                                   n, n_pages, width, G=group, SEL_P2=max(16, triton.next_power_of_2(n)),
                                   BLOCK=1024)
    return union, counts, bits


def group_page_union_reference(page_indices: Tensor, page_counts: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """``group_page_union`` in torch (the tests' oracle): sort the group's entries, merge equal pages, sum bits."""
    B, Hq, n = page_indices.shape
    device = page_indices.device
    none = torch.iinfo(torch.int32).max  # unused entries sort last and form their own segment
    used = torch.arange(n, device=device) < page_counts[..., None]
    flat = torch.where(used, page_indices.to(torch.int32), none).view(B, Hq // group, group * n)
    pages, order = flat.sort(-1)
    head_bit = (1 << torch.arange(group, device=device, dtype=torch.int32)).repeat_interleave(n)
    bits = head_bit.expand_as(flat).gather(-1, order)
    first = torch.ones_like(pages, dtype=torch.bool)
    first[..., 1:] = pages[..., 1:] != pages[..., :-1]
    segment = first.cumsum(-1) - 1
    union = torch.zeros_like(pages).scatter_(-1, segment, pages)  # every entry of a segment holds the same page
    union_bits = torch.zeros_like(bits).scatter_add_(-1, segment, bits)  # distinct powers of two: sum = or
    counts = (first & (pages != none)).sum(-1, dtype=torch.int32)
    return union, counts, union_bits


def _pick_impl(impl: str, q: Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl: got {impl!r}, expected one of {IMPLS}")
    if impl == "triton" and q.device.type != "cuda" and not _interpret():
        raise ValueError(f"impl='triton': tensors are on {q.device}; the Triton kernel needs CUDA "
                         "(or TRITON_INTERPRET=1 for the interpreter)")
    if impl != "auto":
        return impl
    chosen = "triton" if q.device.type == "cuda" else "reference"
    if chosen not in _logged:
        _logged.add(chosen)
        log.info("longattn.decode_attention impl='auto' chose %r on %s", chosen, q.device.type)
    return chosen


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, *, cache_seqlens: Tensor | None = None,
                     block_table: Tensor | None = None, page_size: int | None = None,
                     page_indices: Tensor | None = None, page_counts: Tensor | None = None,
                     scale: float | None = None, impl: str = "auto", return_lse: bool = False):
    """Attention of the last Tq tokens q [B, Hq, Tq, D] over a KV cache (flash-decoding on GPU).

    Cache: contiguous [B, Hkv, S_max, D] (valid length per sequence = cache_seqlens [B], or per (sequence, kv
    head) = cache_seqlens [B, Hkv], as after per-head eviction; default S_max) or paged
    [num_pages, Hkv, page_size, D] with block_table [B, max_pages] mapping logical to physical pages.
    Selection: page_indices [B, Hkv, n_sel] logical page numbers (pages of page_size tokens, on a contiguous
    cache too), of which the first page_counts [B, Hkv] are read (distinct, any order; the rest is padding);
    the query heads of a group share them. Or one set per query head, page_indices [B, Hq, n_sel] with
    page_counts [B, Hq] (Quest's own form): the kernel reads the group's union once and each head attends its
    own pages (at most 31 query heads per kv head).
    Query i (of Tq) sees tokens < len - Tq + i + 1. Returns out [B, Hq, Tq, D] (q's dtype), and with
    ``return_lse`` also lse [B, Hq, Tq] float32 (natural log; -inf and zero output where nothing is seen).
    CUDA graphs: capture after one eager call with the same shapes (it compiles and autotunes); while capturing,
    the value checks (which read a verdict back) are skipped and the captured step reads cache_seqlens,
    block_table and the selection afresh at each replay. Eagerly, those checks cost one synchronisation per call.
    """
    lengths, page_size = check_decode_inputs(q, k_cache, v_cache, cache_seqlens, block_table, page_size,
                                             page_indices, page_counts)
    chosen = _pick_impl(impl, q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if chosen == "triton":
        out, lse = decode_triton(q, k_cache, v_cache, lengths, block_table, page_size, page_indices, page_counts,
                                 scale)
    else:
        out, lse = decode_reference(q, k_cache, v_cache, cache_seqlens=lengths, block_table=block_table,
                                    page_size=page_size, page_indices=page_indices, page_counts=page_counts,
                                    scale=scale)
    return (out, lse) if return_lse else out
