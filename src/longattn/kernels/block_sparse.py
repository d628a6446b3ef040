"""Triton block-sparse flash attention: forward, and backward as a row-sum pass (delta) then two kernels (dQ per
query block, longest rows first; dK/dV per kv block over the transposed lists, GQA heads summed in-program, so no
atomics and deterministic results).

Each program walks the block list of its (batch, head, block): *full* blocks with no masking, then *partial*
blocks whose element mask is read from the BlockSparse's bit tiles. Tokens come from the blocks' start/length
tables, so plain batches, sequence tails and packed variable-length batches share one code path. An optional
additive bias given by low-rank factors (bias = U @ W.T, as FlashBias) is one extra small dot per tile.

A BlockSparse with gathered columns (vertical lines, ``BlockSparse.with_columns``) adds a third forward phase: the
query block's visible columns are read BLOCK_N indices at a time and K/V rows loaded by index (no K/V copies, GQA
by head index), skipping columns whose kv block is already in the block list (kept-block bitmap) and columns past
each query's position; the online softmax continues across all phases. Forward only (prefill).

On sm90+ GPUs the forward of plain batches (no bias, no gathered columns, fp16/bf16) runs a second kernel,
_fwd_tma_kernel: Q/K/V/O move through 4-d tensor descriptors (TMA), query blocks run last-first (longest causal
rows first), and the softmax folds the scale into one FMA with the P@V product accumulating in place. On Hopper
with 128 x 128 blocks a third, warp-specialised Gluon kernel takes those calls (block_sparse_gluon.py: softmax
overlapped with the tensor cores, 1.2-1.5x faster on an H200), and Gluon kernels of the same layout run the
backward's dQ and dK/dV (block_sparse_gluon_bwd.py). Everything else, and the interpreter, takes the generic kernels;
``block_sparse_forward(path=...)`` / ``block_sparse_backward(path=...)`` force any of them.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

from longattn.masks.block_sparse import BlockSparse

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(name: str, sizes: list[tuple[int, int, int]]) -> list[triton.Config]:
    """Autotuning candidates (sub-tile size, warps, stages); the interpreter gets only the smallest tile."""
    if INTERPRET:
        sizes = [min(sizes)]
    return [triton.Config({name: s}, num_warps=w, num_stages=st) for s, w, st in sizes]


def _prune_split(configs, named_args, **kwargs):
    """Keep sub-tile sizes no larger than the sparse block they split (both are powers of two)."""
    args = {**named_args, **kwargs}
    out = []
    for c in configs:
        name, limit = ("BLOCK_N", args["BLOCK_KV"]) if "BLOCK_N" in c.kwargs else ("BLOCK_M1", args["BLOCK_Q"])
        if c.kwargs[name] <= limit:
            out.append(c)
    if not out:
        return [min(configs, key=lambda c: next(iter(c.kwargs.values())))]
    # Forward at head_dim >= 128: 128-wide kv tiles with 8 warps won every H100 sweep (NOTES-kernels.md); on
    # long kernels autotune gets ~1 timing sample per config, so keeping noise-picked losers out matters.
    wide = [c for c in out if c.kwargs.get("BLOCK_N") == 128 and c.num_warps == 8]
    if "BLOCK_N" in out[0].kwargs and args["HEAD_DIM"] >= 128 and "DQ" not in args and wide:
        return wide
    # Backward at head_dim >= 128: every 4-warp config ran 1.4-3x slower than the 8-warp ones (H200 sweep,
    # NOTES-kernels.md, 2026-12-03), so only 8-warp candidates are timed.
    eight = [c for c in out if c.num_warps == 8]
    if ("DQ" in args or "DK" in args) and args["HEAD_DIM"] >= 128 and eight:
        return eight
    return out


@triton.jit
def _block_span(STARTS, LENS, i, BLOCK: tl.constexpr, SEQ, PACKED: tl.constexpr):
    """(first token, valid length) of virtual block i: read from the tables only for packed batches, so the
    plain path has no dependent loads in its inner loop."""
    if PACKED:
        start = tl.load(STARTS + i).to(tl.int64)
        length = tl.load(LENS + i)
    else:
        start = i.to(tl.int64) * BLOCK
        length = tl.minimum(SEQ - start, BLOCK).to(tl.int32)
    return start, length


@triton.jit
def _load(ptrs, valid, MASKED: tl.constexpr):
    """Tile load; bounds-checked (zeros outside) only where the block may be incomplete."""
    if MASKED:
        return tl.load(ptrs, mask=valid, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _tile_keep(TILES, tile, rows, col0, BLOCK_Q: tl.constexpr, WORDS: tl.constexpr, NROWS: tl.constexpr,
               NCOLS: tl.constexpr):
    """Element mask [NROWS, NCOLS] of a partial block: columns col0 .. col0 + NCOLS of bit tile ``tile``.
    Loads NCOLS / 32 words per row (vectorisable) and expands the bits in registers."""
    NW: tl.constexpr = NCOLS // 32
    w = tl.load(TILES + tile * (BLOCK_Q * WORDS) + rows[:, None] * WORDS + (col0 // 32 + tl.arange(0, NW))[None, :])
    bits = (w[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, [NROWS, NCOLS]) != 0


@triton.jit
def _tile_keep_t(TILES, tile, rows, BLOCK_Q: tl.constexpr, WORDS: tl.constexpr, NROWS: tl.constexpr):
    """Transposed element mask [BLOCK_KV, NROWS] of a partial block for query rows ``rows``: the words are
    loaded kv-major and expanded in that order, so no register transpose is needed (dK/dV kernel)."""
    w = tl.load(TILES + tile * (BLOCK_Q * WORDS) + rows[None, :] * WORDS + tl.arange(0, WORDS)[:, None])
    bits = (w[:, None, :] >> tl.arange(0, 32)[None, :, None]) & 1
    return tl.reshape(bits, [WORDS * 32, NROWS]) != 0


# -------------------------------------------------------------------------------------------------- forward
@triton.autotune(
    configs=_configs("BLOCK_N", [(64, 4, 3), (64, 8, 3), (128, 8, 3), (128, 8, 2), (64, 8, 4), (64, 4, 4), (32, 4, 3)]),
    key=["HEAD_DIM", "BLOCK_Q", "BLOCK_KV", "HAS_BIAS", "DTYPE_KEY", "PACKED", "HAS_COLS"],
    prune_configs_by={"early_config_prune": _prune_split},
)
@triton.jit
def _fwd_kernel(
    Q, K, V, Out, LSE, BU, BW,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om, s_lb, s_lh,
    s_ub, s_uh, s_um, s_wb, s_wh, s_wn,
    IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch,
    QS, QL, KS, KL,
    COLS, CEND, KEPT, s_cc_b, s_cc_h, s_ce_b, s_ce_h, s_kp_b, s_kp_h, s_kp_m,
    qk_scale, H, GROUP, SEQ_Q, SEQ_KV,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, RANK: tl.constexpr, PREC: tl.constexpr,
    DTYPE_KEY: tl.constexpr, PACKED: tl.constexpr, HAS_COLS: tl.constexpr,
):
    SPLIT: tl.constexpr = BLOCK_KV // BLOCK_N
    WORDS: tl.constexpr = BLOCK_KV // 32
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // GROUP).to(tl.int64)
    q0, qlen = _block_span(QS, QL, pid_m, BLOCK_Q, SEQ_Q, PACKED)
    offs_m = tl.arange(0, BLOCK_Q)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < qlen
    q = tl.load(Q + b * s_qb + h * s_qh + (q0 + offs_m)[:, None] * s_qm + offs_d[None, :],
                mask=m_valid[:, None], other=0.0)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    if HAS_BIAS:
        offs_r = tl.arange(0, RANK)
        u = tl.load(BU + b * s_ub + h * s_uh + (q0 + offs_m)[:, None] * s_um + offs_r[None, :],
                    mask=m_valid[:, None], other=0.0)
        w_base = BW + b * s_wb + h * s_wh
    row = b * s_ib + h * s_ih + pid_m * s_im
    crow = b * s_cb + h * s_ch + pid_m
    n_full = tl.load(FULL + crow) * SPLIT
    n_all = tl.load(CNT + crow) * SPLIT
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
    # Phase 0 walks the full blocks with no masking; phase 1 the partial ones (bounds and bit tile applied).
    for phase in tl.static_range(2):
        for j in range(n_full * phase, n_full + (n_all - n_full) * phase):
            e = j // SPLIT
            kb = tl.load(IDX + row + e)
            k0, klen = _block_span(KS, KL, kb, BLOCK_KV, SEQ_KV, PACKED)
            cols = (j % SPLIT) * BLOCK_N + offs_n
            n_valid = cols < klen
            kt = _load(k_base + (k0 + cols)[None, :] * s_kn + offs_d[:, None], n_valid[None, :], phase == 1)
            s = tl.dot(q, kt, input_precision=PREC) * qk_scale
            if HAS_BIAS:
                wt = _load(w_base + (k0 + cols)[None, :] * s_wn + offs_r[:, None], n_valid[None, :], phase == 1)
                s += tl.dot(u, wt, input_precision=PREC) * 1.4426950408889634
            if phase == 1:
                tile = tl.load(TID + row + e).to(tl.int64)
                keep = _tile_keep(TILES, tile, offs_m, (j % SPLIT) * BLOCK_N, BLOCK_Q, WORDS, BLOCK_Q, BLOCK_N)
                s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if phase == 1:  # a partial tile can leave a row with nothing yet: keep exp2 away from -inf - -inf
                m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load(v_base + (k0 + cols)[:, None] * s_vn + offs_d[None, :], n_valid[:, None], phase == 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
    if HAS_COLS:  # phase 2: gathered columns outside the kept blocks, causal per query
        m_i = tl.where(l_i == 0.0, float("-inf"), m_i)  # a row with nothing yet restarts from -inf
        q_pos = q0 + offs_m + (SEQ_KV - SEQ_Q)
        col_base = COLS + b * s_cc_b + h * s_cc_h
        kept_base = KEPT + b * s_kp_b + h * s_kp_h + pid_m * s_kp_m
        n_cols = tl.load(CEND + b * s_ce_b + h * s_ce_h + pid_m)
        for t in range(0, n_cols, BLOCK_N):
            ci = t + offs_n
            c_valid = ci < n_cols
            c = tl.load(col_base + ci, mask=c_valid, other=0)
            kb = c // BLOCK_KV
            word = tl.load(kept_base + kb // 32, mask=c_valid, other=0)
            use = c_valid & (((word >> (kb % 32)) & 1) == 0)
            c64 = c.to(tl.int64)
            kt = tl.load(k_base + c64[None, :] * s_kn + offs_d[:, None], mask=use[None, :], other=0.0)
            s = tl.dot(q, kt, input_precision=PREC) * qk_scale
            if HAS_BIAS:
                wt = tl.load(w_base + c64[None, :] * s_wn + offs_r[:, None], mask=use[None, :], other=0.0)
                s += tl.dot(u, wt, input_precision=PREC) * 1.4426950408889634
            s = tl.where(use[None, :] & (c[None, :] <= q_pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + c64[:, None] * s_vn + offs_d[None, :], mask=use[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(Out + b * s_ob + h * s_oh + (q0 + offs_m)[:, None] * s_om + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_valid[:, None])
    tl.store(LSE + b * s_lb + h * s_lh + q0 + offs_m, lse, mask=m_valid)


# ------------------------------------------------------------------------------------------ forward, TMA path
def _tma_configs() -> list[triton.Config]:
    """Candidates for the TMA forward (warps, stages); the interpreter gets one. A warp-specialised kv loop
    (``tl.range(warp_specialize=True)``) was no faster on H100 with Triton 3.6 and sometimes 12% slower."""
    sizes = [(8, 2), (8, 3), (4, 2), (4, 3), (2, 2), (2, 3)]
    if INTERPRET:
        sizes = sizes[:1]
    return [triton.Config({}, num_warps=w, num_stages=st) for w, st in sizes]


def _prune_tma(configs, named_args, **kwargs):
    """8 warps for 128-row query tiles (every sweep's winner); fewer warps (more programs per SM to hide load
    latency on short rows) only for smaller tiles: 4 from 64 rows, 2 from 32 (HiP's 32x32 blocks)."""
    rows = {**named_args, **kwargs}["BLOCK_Q"]
    least = 8 if rows >= 128 else 4 if rows >= 64 else 2
    return [c for c in configs if c.num_warps >= least] or configs


@triton.jit
def _tile(desc, b, h, row0, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """[BLOCK, HEAD_DIM] rows row0.. of head (b, h) through a 4-d (batch, head, seq, dim) tensor descriptor;
    rows past the sequence read as zeros."""
    return desc.load([b, h, row0, 0]).reshape(BLOCK, HEAD_DIM)


@triton.autotune(configs=_tma_configs(), key=["HEAD_DIM", "BLOCK_Q", "BLOCK_KV", "DTYPE_KEY"],
                 prune_configs_by={"early_config_prune": _prune_tma})
@triton.jit
def _fwd_tma_kernel(
    desc_q, desc_k, desc_v, desc_o, LSE, s_lb, s_lh,
    IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch,
    qk_scale, H, GROUP, SEQ_Q, N_QB,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, HEAD_DIM: tl.constexpr, DTYPE_KEY: tl.constexpr,
):
    """Forward for plain batches without bias or gathered columns: K/V (and Q/O) move by tensor descriptors
    (TMA on Hopper), one kv block per step, the full-block loop has no mask work. Same results as _fwd_kernel."""
    WORDS: tl.constexpr = BLOCK_KV // 32
    pid_m = N_QB - 1 - tl.program_id(0)  # last query blocks first: under causal-like masks the longest rows
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q0 = pid_m * BLOCK_Q
    offs_m = tl.arange(0, BLOCK_Q)
    q = _tile(desc_q, b, h, q0, BLOCK_Q, HEAD_DIM)
    row = b.to(tl.int64) * s_ib + h * s_ih + pid_m * s_im
    crow = b.to(tl.int64) * s_cb + h * s_ch + pid_m
    n_full = tl.load(FULL + crow)
    n_all = tl.load(CNT + crow)
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
    for j in range(0, n_full):  # full blocks: every score is finite
        k0 = tl.load(IDX + row + j) * BLOCK_KV
        s = tl.dot(q, tl.trans(_tile(desc_k, b, hk, k0, BLOCK_KV, HEAD_DIM)))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(desc_v, b, hk, k0, BLOCK_KV, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    for j in range(n_full, n_all):  # partial blocks: bit tile applied; a row may stay at -inf
        k0 = tl.load(IDX + row + j) * BLOCK_KV
        s = tl.dot(q, tl.trans(_tile(desc_k, b, hk, k0, BLOCK_KV, HEAD_DIM))) * qk_scale
        tile = tl.load(TID + row + j).to(tl.int64)
        s = tl.where(_tile_keep(TILES, tile, offs_m, 0, BLOCK_Q, WORDS, BLOCK_Q, BLOCK_KV), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(desc_v, b, hk, k0, BLOCK_KV, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    desc_o.store([b, h, q0, 0], out.to(q.dtype).reshape(1, 1, BLOCK_Q, HEAD_DIM))
    tl.store(LSE + b.to(tl.int64) * s_lb + h * s_lh + q0 + offs_m, lse, mask=offs_m < SEQ_Q - q0)


# -------------------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_delta_kernel(OUT, DO, DLSE, DELTA, s_ob, s_oh, s_om, s_db, s_dh, s_dm, H, SEQ,
                      HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta = rowsum(dO * O) - dLSE in fp32, reading O and dO once in their own dtype (delta is [B, H, S]
    contiguous, as is dLSE)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = offs_m < SEQ
    o = tl.load(OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :], mask=valid[:, None], other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_dm + offs_d[None, :], mask=valid[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = pid_bh.to(tl.int64) * SEQ + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=valid, other=0.0)
    tl.store(DELTA + row, delta, mask=valid)


def _delta(out: Tensor, do: Tensor, dlse: Tensor | None) -> Tensor:
    """The backward's per-row correction term (float32 [B, H, S]); a gradient on the LSE output folds in."""
    B, H, S, D = out.shape
    delta = torch.empty((B, H, S), dtype=torch.float32, device=out.device)
    if dlse is not None:
        dlse = dlse.float().contiguous()
    block = 16 if INTERPRET else 64
    _bwd_delta_kernel[(triton.cdiv(S, block), B * H)](
        out, do, dlse if dlse is not None else delta, delta, *out.stride()[:3], *do.stride()[:3], H, S,
        HAS_DLSE=dlse is not None, BLOCK_M=block, HEAD_DIM=D,
    )
    return delta


@triton.autotune(
    configs=_configs("BLOCK_N", [(32, 4, 3), (64, 8, 3), (64, 4, 3), (32, 8, 4), (64, 8, 2), (128, 8, 2),
                                  (128, 8, 3)]),
    key=["HEAD_DIM", "BLOCK_Q", "BLOCK_KV", "HAS_BIAS", "DTYPE_KEY", "PACKED"],
    prune_configs_by={"early_config_prune": _prune_split},
)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, BU, BW, DU,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_lb, s_lh,
    s_ub, s_uh, s_um, s_wb, s_wh, s_wn,
    IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch,
    QS, QL, KS, KL,
    sm_scale, H, GROUP, SEQ_Q, SEQ_KV,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, RANK: tl.constexpr, PREC: tl.constexpr,
    DTYPE_KEY: tl.constexpr, PACKED: tl.constexpr,
):
    """dQ (and dU) for one query block; Q, DO, DQ, DU share the q strides (contiguous copies)."""
    SPLIT: tl.constexpr = BLOCK_KV // BLOCK_N
    WORDS: tl.constexpr = BLOCK_KV // 32
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # last query blocks first: longest causal rows first
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // GROUP).to(tl.int64)
    q0, qlen = _block_span(QS, QL, pid_m, BLOCK_Q, SEQ_Q, PACKED)
    offs_m = tl.arange(0, BLOCK_Q)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < qlen
    q_off = b * s_qb + h * s_qh + (q0 + offs_m)[:, None] * s_qm + offs_d[None, :]
    q = tl.load(Q + q_off, mask=m_valid[:, None], other=0.0)
    do = tl.load(DO + q_off, mask=m_valid[:, None], other=0.0)
    lse = tl.load(LSE + b * s_lb + h * s_lh + q0 + offs_m, mask=m_valid, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + b * s_lb + h * s_lh + q0 + offs_m, mask=m_valid, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    if HAS_BIAS:
        offs_r = tl.arange(0, RANK)
        u_off = b * s_ub + h * s_uh + (q0 + offs_m)[:, None] * s_um + offs_r[None, :]
        u = tl.load(BU + u_off, mask=m_valid[:, None], other=0.0)
        w_base = BW + b * s_wb + h * s_wh
        du = tl.zeros([BLOCK_Q, RANK], tl.float32)
    row = b * s_ib + h * s_ih + pid_m * s_im
    crow = b * s_cb + h * s_ch + pid_m
    n_full = tl.load(FULL + crow) * SPLIT
    n_all = tl.load(CNT + crow) * SPLIT
    dq = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
    for phase in tl.static_range(2):  # full blocks, then partial blocks (masked)
        for j in range(n_full * phase, n_full + (n_all - n_full) * phase):
            e = j // SPLIT
            kb = tl.load(IDX + row + e)
            k0, klen = _block_span(KS, KL, kb, BLOCK_KV, SEQ_KV, PACKED)
            cols = (j % SPLIT) * BLOCK_N + offs_n
            n_valid = cols < klen
            kt = _load(k_base + (k0 + cols)[None, :] * s_kn + offs_d[:, None], n_valid[None, :], phase == 1)
            vt = _load(v_base + (k0 + cols)[None, :] * s_vn + offs_d[:, None], n_valid[None, :], phase == 1)
            s = tl.dot(q, kt, input_precision=PREC) * qk_scale
            if HAS_BIAS:
                wt = _load(w_base + (k0 + cols)[None, :] * s_wn + offs_r[:, None], n_valid[None, :], phase == 1)
                s += tl.dot(u, wt, input_precision=PREC) * 1.4426950408889634
            p = tl.math.exp2(s - lse[:, None])
            if phase == 1:
                tile = tl.load(TID + row + e).to(tl.int64)
                keep = _tile_keep(TILES, tile, offs_m, (j % SPLIT) * BLOCK_N, BLOCK_Q, WORDS, BLOCK_Q, BLOCK_N)
                p = tl.where(keep, p, 0.0)
            ds = p * (tl.dot(do, vt, input_precision=PREC) - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
            if HAS_BIAS:
                du += tl.dot(ds.to(wt.dtype), tl.trans(wt), input_precision=PREC)
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_valid[:, None])
    if HAS_BIAS:
        tl.store(DU + u_off, du.to(DU.dtype.element_ty), mask=m_valid[:, None])


@triton.autotune(
    configs=_configs("BLOCK_M1", [(32, 4, 3), (64, 8, 3), (32, 8, 3), (64, 4, 2), (16, 4, 3), (64, 8, 2), (32, 8, 4),
                                   (64, 8, 4)]),
    key=["HEAD_DIM", "BLOCK_Q", "BLOCK_KV", "HAS_BIAS", "DTYPE_KEY", "PACKED"],
    prune_configs_by={"early_config_prune": _prune_split},
)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, BU, BW, DW,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_lb, s_lh,
    s_ub, s_uh, s_um, s_wb, s_wh, s_wn,
    IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch,
    QS, QL, KS, KL,
    sm_scale, HKV, GROUP, SEQ_Q, SEQ_KV,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_M1: tl.constexpr,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, RANK: tl.constexpr, PREC: tl.constexpr,
    DTYPE_KEY: tl.constexpr, PACKED: tl.constexpr,
):
    """dK, dV for one kv block (summed over the GQA group's query heads) and dW per query head.
    Q/DO share strides, K/V/DK/DV share strides, LSE/DELTA share strides; lists are the transposed (CSC) ones."""
    SPLIT: tl.constexpr = BLOCK_Q // BLOCK_M1
    WORDS: tl.constexpr = BLOCK_KV // 32
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    k0, klen = _block_span(KS, KL, pid_n, BLOCK_KV, SEQ_KV, PACKED)
    offs_n = tl.arange(0, BLOCK_KV)
    offs_m = tl.arange(0, BLOCK_M1)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n < klen
    kv_off = b * s_kb + hk * s_kh + (k0 + offs_n)[:, None] * s_kn + offs_d[None, :]
    k = tl.load(K + kv_off, mask=n_valid[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=n_valid[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_KV, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_KV, HEAD_DIM], tl.float32)
    if HAS_BIAS:
        offs_r = tl.arange(0, RANK)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        if HAS_BIAS:
            w_off = b * s_wb + h * s_wh + (k0 + offs_n)[:, None] * s_wn + offs_r[None, :]
            w = tl.load(BW + w_off, mask=n_valid[:, None], other=0.0)
            dw = tl.zeros([BLOCK_KV, RANK], tl.float32)
        row = b * s_ib + h * s_ih + pid_n * s_im
        crow = b * s_cb + h * s_ch + pid_n
        n_full = tl.load(FULL + crow) * SPLIT
        n_all = tl.load(CNT + crow) * SPLIT
        for phase in tl.static_range(2):  # full blocks, then partial blocks (masked)
            for j in range(n_full * phase, n_full + (n_all - n_full) * phase):
                e = j // SPLIT
                qb = tl.load(IDX + row + e)
                rows = (j % SPLIT) * BLOCK_M1 + offs_m
                q0, qlen = _block_span(QS, QL, qb, BLOCK_Q, SEQ_Q, PACKED)
                m_valid = rows < qlen
                lse = tl.load(LSE + b * s_lb + h * s_lh + q0 + rows, mask=m_valid, other=float("inf"))
                lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
                delta = tl.load(DELTA + b * s_lb + h * s_lh + q0 + rows, mask=m_valid, other=0.0)
                q_off = b * s_qb + h * s_qh + (q0 + rows)[None, :] * s_qm + offs_d[:, None]
                qt = _load(Q + q_off, m_valid[None, :], phase == 1)  # [D, M1]
                # dP^T does not depend on S: issued first, its MMA overlaps the exp2 of P below (-2% dK/dV time
                # at 64k on the H200).
                do = _load(DO + b * s_qb + h * s_qh + (q0 + rows)[:, None] * s_qm + offs_d[None, :],
                           m_valid[:, None], phase == 1)  # [M1, D]
                dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
                st = tl.dot(k, qt, input_precision=PREC) * qk_scale  # [KV, M1]
                if HAS_BIAS:
                    ut = _load(BU + b * s_ub + h * s_uh + (q0 + rows)[None, :] * s_um + offs_r[:, None],
                               m_valid[None, :], phase == 1)
                    st += tl.dot(w, ut, input_precision=PREC) * 1.4426950408889634
                pt = tl.math.exp2(st - lse[None, :])
                if phase == 1:
                    tile = tl.load(TID + row + e).to(tl.int64)
                    pt = tl.where(_tile_keep_t(TILES, tile, rows, BLOCK_Q, WORDS, BLOCK_M1), pt, 0.0)
                dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PREC)
                if HAS_BIAS:
                    dw += tl.dot(dst.to(ut.dtype), tl.trans(ut), input_precision=PREC)
        if HAS_BIAS:
            tl.store(DW + w_off, dw.to(DW.dtype.element_ty), mask=n_valid[:, None])
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=n_valid[:, None])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=n_valid[:, None])


# -------------------------------------------------------------------------------------------------- launchers
def _list_args(bs_lists) -> tuple:
    """Lists then strides for the kernels; broadcast (size-1) batch/head dims get stride 0."""
    idx, cnt, full, tid = bs_lists
    s_ib = idx.stride(0) if idx.shape[0] > 1 else 0
    s_ih = idx.stride(1) if idx.shape[1] > 1 else 0
    s_cb = cnt.stride(0) if cnt.shape[0] > 1 else 0
    s_ch = cnt.stride(1) if cnt.shape[1] > 1 else 0
    return (idx, cnt, full, tid, s_ib, s_ih, idx.stride(2), s_cb, s_ch)


def _q_lists(bs: BlockSparse) -> tuple:
    """Per query block: the kv blocks it reads (the forward's and dQ's lists), as _list_args gives them."""
    return _list_args((bs.kv_indices, bs.kv_counts, bs.full_counts, bs.tile_ids))


def _kv_lists(bs: BlockSparse) -> tuple:
    """Per kv block: the query blocks that read it (dK/dV's lists), as _list_args gives them."""
    return _list_args(tuple(bs.transposed()))


def _tiles(bs: BlockSparse) -> Tensor:
    return bs.tiles if bs.tiles.numel() else torch.zeros(1, *bs.tiles.shape[1:], dtype=torch.int32,
                                                         device=bs.device)


def _column_args(bs: BlockSparse) -> tuple:
    """Gathered-column tensors and their (batch, head[, row]) strides; stride 0 on broadcast dims."""
    if bs.columns is None:
        z = bs.kv_counts
        return (z, z, z) + (0,) * 7
    cols, ends, kept = bs.column_lists()

    def bh(t: Tensor) -> tuple[int, int]:
        return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0)

    return (cols, ends, kept, *bh(cols), *bh(ends), *bh(kept), kept.stride(2))


def _bias_args(bias: tuple[Tensor, Tensor] | None, q: Tensor) -> tuple[Tensor, Tensor, tuple, int]:
    if bias is None:
        return q, q, (0,) * 6, 16
    u, w = bias
    return u, w, (u.stride(0), u.stride(1), u.stride(2), w.stride(0), w.stride(1), w.stride(2)), u.shape[-1]


def _empty_like(t: Tensor) -> Tensor:
    """Output buffer allocation (one place, so tests can poison fresh buffers with NaN)."""
    return torch.empty_like(t)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _prec(q: Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _tma_applies(q: Tensor, k: Tensor, v: Tensor, out: Tensor, bs: BlockSparse, bias) -> bool:
    """Whether the TMA forward can take these inputs: CUDA sm90+ (or the interpreter), fp16/bf16, plain batches,
    no bias, no gathered columns, 16-byte aligned tensors and strides."""
    if bias is not None or bs.columns is not None or bs.varlen or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not INTERPRET and not (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9):
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0
               for s in t.stride()[:-1]) for t in (q, k, v, out))


def _fwd_tma_args(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bs: BlockSparse,
                  scale: float) -> tuple[tuple[int, int], tuple, dict]:
    """Grid, arguments and constexprs of the TMA forward (4-d tensor descriptors over q, k, v, out)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, H, Sq, D = q.shape
    bq, bkv = bs.block_size

    def desc(t: Tensor, rows: int) -> TensorDescriptor:
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, D])

    lists = _q_lists(bs)
    nqb = len(bs.q_blocks)
    args = (desc(q, bq), desc(k, bkv), desc(v, bkv), desc(out, bq), lse, lse.stride(0), lse.stride(1),
            *lists[:4], _tiles(bs), *lists[4:], scale * LOG2E, H, H // k.shape[1], Sq, nqb)
    return (nqb, B * H), args, dict(BLOCK_Q=bq, BLOCK_KV=bkv, HEAD_DIM=D, DTYPE_KEY=str(q.dtype))


def _gluon_applies(q: Tensor, bs: BlockSparse) -> bool:
    """Whether the Gluon forward (Hopper only, 128 x 128 blocks, head_dim 64/128) takes inputs the TMA path takes.
    A Triton without Gluon's Hopper API (older than 3.5) keeps the TMA kernel, with a warning once."""
    if INTERPRET or not q.is_cuda:
        return False
    try:
        from longattn.kernels.block_sparse_gluon import gluon_applies
    except ImportError as e:
        if not _GLUON_MISSING:
            _GLUON_MISSING.append(str(e))
            warnings.warn(f"block-sparse attention: the Hopper Gluon kernels need Triton >= 3.5 ({e}); running "
                          f"the Triton kernels (about 1.3x slower forward on sm90)", RuntimeWarning, stacklevel=3)
        return False
    return gluon_applies(q, bs)


_GLUON_MISSING: list[str] = []  # the import error, once it has been warned about


def forward_kernel(q: Tensor, k: Tensor, v: Tensor, bs: BlockSparse, bias: tuple[Tensor, Tensor] | None = None,
                   path: str = "auto", out: Tensor | None = None) -> str:
    """Which forward kernel a call runs: "gluon" (warp-specialised Hopper kernel, kernels/block_sparse_gluon.py),
    "tma" (Triton tensor-descriptor kernel) or "generic"; ``path="auto"`` takes the first that applies, a forced
    path is checked (ValueError naming ``path`` when it cannot run these inputs). Benchmarks record it per row."""
    if path not in ("auto", "gluon", "tma", "generic"):
        raise ValueError(f"path: expected 'auto', 'gluon', 'tma' or 'generic', got {path!r}")
    applies = path != "generic" and _tma_applies(q, k, v, q if out is None else out, bs, bias)
    if path in ("tma", "gluon") and not applies:
        raise ValueError(f"path: {path!r} needs fp16/bf16 plain batches without bias or gathered columns, "
                         "16-byte aligned, on a CUDA sm90+ device" + (" or the interpreter" if path == "tma" else ""))
    gluon = applies and path in ("auto", "gluon") and _gluon_applies(q, bs)
    if path == "gluon" and not gluon:
        raise ValueError("path: 'gluon' needs a Hopper (sm90) GPU, 128 x 128 blocks and head_dim 64 or 128")
    if gluon:
        return "gluon"
    return "tma" if applies and (path == "tma" or not INTERPRET) else "generic"


def block_sparse_forward(q: Tensor, k: Tensor, v: Tensor, bs: BlockSparse, scale: float,
                         bias: tuple[Tensor, Tensor] | None = None, path: str = "auto") -> tuple[Tensor, Tensor]:
    """Launch the forward kernel. Inputs validated by the caller; last dims contiguous, bias rank padded to 16k.
    ``path``: "gluon", "tma", "generic" or "auto" (see forward_kernel)."""
    B, H, Sq, D = q.shape
    out = _empty_like(q)
    lse = _empty((B, H, Sq), torch.float32, q.device)
    kernel = forward_kernel(q, k, v, bs, bias, path, out)
    if kernel == "gluon":
        from longattn.kernels.block_sparse_gluon import gluon_forward

        lists = _q_lists(bs)
        gluon_forward(q, k, v, out, lse, bs, scale * LOG2E, lists, _tiles(bs))
        return out, lse
    if kernel == "tma":
        grid, args, consts = _fwd_tma_args(q, k, v, out, lse, bs, scale)
        _fwd_tma_kernel[grid](*args, **consts)
        return out, lse
    bu, bw, bias_strides, rank = _bias_args(bias, q)
    bq, bkv = bs.block_size
    lists = _q_lists(bs)
    grid = (len(bs.q_blocks), B * H)
    _fwd_kernel[grid](
        q, k, v, out, lse, bu, bw,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), *bias_strides,
        *lists[:4], _tiles(bs), *lists[4:],
        bs.q_blocks.starts, bs.q_blocks.lens, bs.kv_blocks.starts, bs.kv_blocks.lens, *_column_args(bs),
        scale * LOG2E, H, H // k.shape[1], Sq, k.shape[2],
        BLOCK_Q=bq, BLOCK_KV=bkv, HEAD_DIM=D, HAS_BIAS=bias is not None, RANK=rank, PREC=_prec(q),
        DTYPE_KEY=str(q.dtype), PACKED=bs.varlen, HAS_COLS=bs.columns is not None,
    )
    return out, lse


def backward_kernel(q: Tensor, k: Tensor, v: Tensor, do: Tensor, bs: BlockSparse,
                    bias: tuple[Tensor, Tensor] | None = None, path: str = "auto") -> str:
    """Which backward kernels (dQ and dK/dV) a call runs: "gluon" (warp-specialised Hopper kernels,
    block_sparse_gluon_bwd.py) or "generic". ``path`` as in forward_kernel; "tma" has no backward of its own and
    runs the generic one; a forced "gluon" that cannot run these inputs is a ValueError naming ``path``."""
    if path not in ("auto", "gluon", "tma", "generic"):
        raise ValueError(f"path: expected 'auto', 'gluon', 'tma' or 'generic', got {path!r}")
    gluon = (path in ("auto", "gluon") and _tma_applies(q, k, v, do, bs, bias) and _gluon_applies(q, bs))
    if path == "gluon" and not gluon:
        raise ValueError("path: 'gluon' needs fp16/bf16 plain batches without bias or gathered columns, 16-byte "
                         "aligned, on a Hopper (sm90) GPU, with 128 x 128 blocks and head_dim 64 or 128")
    return "gluon" if gluon else "generic"


def block_sparse_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          dlse: Tensor | None, bs: BlockSparse, scale: float,
                          bias: tuple[Tensor, Tensor] | None = None, path: str = "auto"):
    """Gradients (dq, dk, dv, du, dw). A gradient on the LSE output folds into delta (dL/ds += dlse * p).
    ``path`` picks the kernels (see backward_kernel)."""
    B, H, Sq, D = q.shape
    Hkv = k.shape[1]
    q, k, v, do = (t.contiguous() for t in (q, k, v, do))
    delta = _delta(out, do, dlse)
    lse = lse.contiguous()
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    if backward_kernel(q, k, v, do, bs, bias, path) == "gluon":
        from longattn.kernels.block_sparse_gluon_bwd import gluon_dkdv, gluon_dq

        tiles = _tiles(bs)
        gluon_dq(q, k, v, do, lse, delta, dq, bs, scale, _q_lists(bs), tiles)
        gluon_dkdv(q, k, v, do, lse, delta, dk, dv, bs, scale, _kv_lists(bs), tiles)
        return dq, dk, dv, None, None
    if bias is not None:
        bias = (bias[0].contiguous(), bias[1].contiguous())
    bu, bw, bias_strides, rank = _bias_args(bias, q)
    du, dw = (_empty_like(bu), _empty_like(bw)) if bias is not None else (q, q)
    bq, bkv = bs.block_size
    lists = _q_lists(bs)
    common = dict(HEAD_DIM=D, HAS_BIAS=bias is not None, RANK=rank, PREC=_prec(q), DTYPE_KEY=str(q.dtype),
                  PACKED=bs.varlen)
    _bwd_dq_kernel[(len(bs.q_blocks), B * H)](
        q, k, v, do, lse, delta, dq, bu, bw, du,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), lse.stride(0), lse.stride(1), *bias_strides,
        *lists[:4], _tiles(bs), *lists[4:],
        bs.q_blocks.starts, bs.q_blocks.lens, bs.kv_blocks.starts, bs.kv_blocks.lens,
        scale, H, H // Hkv, Sq, k.shape[2], BLOCK_Q=bq, BLOCK_KV=bkv, **common,
    )
    tl_lists = _kv_lists(bs)
    _bwd_dkdv_kernel[(len(bs.kv_blocks), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, bu, bw, dw,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1), *bias_strides,
        *tl_lists[:4], _tiles(bs), *tl_lists[4:],
        bs.q_blocks.starts, bs.q_blocks.lens, bs.kv_blocks.starts, bs.kv_blocks.lens,
        scale, Hkv, H // Hkv, Sq, k.shape[2], BLOCK_Q=bq, BLOCK_KV=bkv, **common,
    )
    return dq, dk, dv, (du if bias is not None else None), (dw if bias is not None else None)


class BlockSparseAttention(torch.autograd.Function):
    """Autograd wrapper: returns (out, lse); both carry gradients. ``path`` (default "auto") forces the forward and
    backward kernels (forward_kernel, backward_kernel)."""

    @staticmethod
    def forward(ctx, q, k, v, bias_u, bias_w, bs, scale, path="auto"):
        if bs.columns is not None and any(ctx.needs_input_grad[:5]):
            raise ValueError("mask: a BlockSparse with gathered columns (with_columns) runs forward only (prefill); "
                             "the inputs require grad: call under torch.no_grad() or pass a mask without columns")
        bias = (bias_u, bias_w) if bias_u is not None else None
        out, lse = block_sparse_forward(q, k, v, bs, scale, bias, path)
        ctx.set_materialize_grads(False)  # an unused LSE output gets no zero-filled gradient to subtract
        ctx.save_for_backward(q, k, v, out, lse, bias_u, bias_w)
        ctx.bs, ctx.scale, ctx.path = bs, scale, path
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, bias_u, bias_w = ctx.saved_tensors
        bias = (bias_u, bias_w) if bias_u is not None else None
        if dout is None:  # only the LSE output was used
            dout = torch.zeros_like(out)
        dq, dk, dv, du, dw = block_sparse_backward(dout, q, k, v, out, lse, dlse, ctx.bs, ctx.scale, bias,
                                                   ctx.path)
        return dq, dk, dv, du, dw, None, None, None


def pad_rank(u: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Zero-pad bias factors' rank to a multiple of 16 (tensor-core dot minimum); the product is unchanged."""
    r = u.shape[-1]
    rp = max(16, math.ceil(r / 16) * 16)
    if rp == r:
        return u, w
    return torch.nn.functional.pad(u, (0, rp - r)), torch.nn.functional.pad(w, (0, rp - r))
