"""Triton kernels for causal linear attention (semantics in ``linear_reference``).

Chunked form with the state kept in registers: a *walk* kernel takes one segment of a sequence (one head, one
slice of the state) chunk by chunk, combining softmax-free attention inside each chunk with the query times the
state entering it, then updating the state (fp32). Nothing per chunk goes to memory, so the forward reads q, k, v
and writes o once. The backward has three walks: dq forwards, dk and dv backwards with the state gradient.
When there are few (sequence, head) rows (batch 1 at 1M tokens), sequences are cut into segments walked in parallel;
a state pass then sums each short piece's own contribution and a scan carries states across pieces, so every
segment starts from its true state. Sequences (batch rows or packed ``cu_seqlens``) are described by small tables,
so one code path serves both. A fused recurrent kernel decodes a few tokens from a state.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _state_configs() -> list[triton.Config]:
    """Piece-state kernel: (BK, BV) state tiles and CS tokens per step (any power of two: pieces are whole chunks
    and a tail is masked), deeper pipelines since the pass only streams k and v through one product per step."""
    if INTERPRET:
        return [triton.Config({"BK": 16, "BV": 16, "CS": 32}, num_warps=4, num_stages=1)]
    tiles = ((32, 32, 2), (64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8))
    return [triton.Config({"BK": bk, "BV": bv, "CS": cs}, num_warps=w, num_stages=st)
            for bk, bv, w in tiles for cs in (64, 128) for st in (2, 3) if cs * (bk + bv) * 2 * st <= 160 * 1024]


def _walk_configs(tile: str) -> list[triton.Config]:
    """Walk kernels: one tiled head dim (``tile`` is BK or BV), the other whole."""
    if INTERPRET:
        return [triton.Config({tile: 16}, num_warps=4, num_stages=1)]
    return [triton.Config({tile: size}, num_warps=w, num_stages=2) for size in (32, 64, 128) for w in (4, 8)]


def _prune_tiles(configs, named_args, **kwargs):
    """Tiles no wider than the (power-of-two padded) head dims; at least one config survives."""
    args = {**named_args, **kwargs}
    dk, dv = args["DK"], args["DV"]
    kept = [c for c in configs if c.kwargs.get("BK", 16) <= max(16, triton.next_power_of_2(dk))
            and c.kwargs.get("BV", 16) <= max(16, triton.next_power_of_2(dv))]
    return kept or [min(configs, key=lambda c: c.kwargs.get("BK", 0) + c.kwargs.get("BV", 0))]


def _zero_dgl(nargs: dict, reset_only: bool = False) -> None:
    """Autotuning runs an accumulating kernel many times: clear its gate-gradient buffer before each run."""
    if nargs.get("DGL") is not None:
        nargs["DGL"].zero_()


_PRUNE = {"early_config_prune": _prune_tiles}


@triton.autotune(_state_configs(), key=["DK", "DV", "USE_G", "REVERSE", "SIZE"], prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["SIZE"])
def _piece_state(X, Y, G, OUT, TOT, PIECE_B, PIECE_START, PIECE_LEN, scale, S, NH, SIZE,
               DK: tl.constexpr, DV: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               USE_G: tl.constexpr, REVERSE: tl.constexpr, PREC: tl.constexpr):
    """Each piece's own term from a zero state into OUT [pieces, H, DK, DV] (fp32): forward (X, Y = k, v)
    Σ_t decay(t → end) k_tᵀ v_t; reverse (X, Y = q, do) Σ_t scale · decay(start → t) q_tᵀ do_t. TOT [pieces, H]:
    the piece's summed log-decay."""
    ik, iv, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    j, h = pid // NH, pid % NH
    b = tl.load(PIECE_B + j).to(tl.int64)
    start = tl.load(PIECE_START + j).to(tl.int64)
    length = tl.load(PIECE_LEN + j)
    rk = ik * BK + tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, CS)
    mk, mv = rk < DK, rv < DV
    bh = b * NH + h
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    log_total = tl.sum(tl.zeros([CS], dtype=tl.float32), 0)
    nch = tl.cdiv(length, CS)
    for i in range(nch):
        c = nch - 1 - i if REVERSE else i
        valid = c * CS + rc < length
        t = start + c * CS + rc
        xt = tl.load(X + (bh * S + t[None, :]) * DK + rk[:, None], mask=mk[:, None] & valid[None, :], other=0.0)
        y = tl.load(Y + (bh * S + t[:, None]) * DV + rv[None, :], mask=valid[:, None] & mv[None, :], other=0.0)
        if USE_G:
            g = tl.load(G + bh * S + t, mask=valid, other=0.0)
            cum = tl.cumsum(g, 0)
            total = tl.sum(g, 0)
            xt = (xt * tl.exp(cum if REVERSE else total - cum)[None, :]).to(y.dtype)
            acc = acc * tl.exp(total)
            log_total += total
        acc += tl.dot(xt, y, input_precision=PREC)
    tl.store(OUT + (pid.to(tl.int64) * DK + rk[:, None]) * DV + rv[None, :], acc * scale,
             mask=mk[:, None] & mv[None, :])
    if USE_G:
        tl.store(TOT + pid, log_total, mask=(ik == 0) & (iv == 0))


@triton.jit
def _piece_scan(LOCAL, TOT, INIT, CARRY, FINAL, SEQ_PIECE0, SEQ_NPIECE, NH, DK: tl.constexpr, DV: tl.constexpr,
              BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, HAS_INIT: tl.constexpr,
              REVERSE: tl.constexpr):
    """Carry a state across each sequence's pieces: forward, CARRY[j] = state entering piece j (INIT: initial
    state, FINAL: final state); reverse, CARRY[j] = gradient leaving piece j (INIT: d final, FINAL: d initial)."""
    ik, iv, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    n, h = pid // NH, pid % NH
    first = tl.load(SEQ_PIECE0 + n).to(tl.int64)
    count = tl.load(SEQ_NPIECE + n)
    rk = ik * BK + tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    off = rk[:, None] * DV + rv[None, :]
    m = (rk < DK)[:, None] & (rv < DV)[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        state += tl.load(INIT + pid * DK * DV + off, mask=m, other=0.0)
    for i in range(count):
        j = first + count - 1 - i if REVERSE else first + i
        row = (j * NH + h) * DK * DV
        tl.store(CARRY + row + off, state, mask=m)
        if USE_G:
            state = state * tl.exp(tl.load(TOT + j * NH + h))
        state += tl.load(LOCAL + row + off, mask=m, other=0.0)
    tl.store(FINAL + pid * DK * DV + off, state, mask=m)


# Autotune keys name the split flags and SIZE (the launch's size class, see _size_class): a split call (few rows,
# states in and out) or a small one compiles and runs differently and must not inherit another's tile.
@triton.autotune(_walk_configs("BV"), key=["DK", "DV", "C", "USE_G", "HAS_S0", "STORE_END", "SIZE"],
                 prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["SIZE"])
def _fwd_walk(Q, K, V, G, S0, OUT, END, SEG_B, SEG_START, SEG_LEN, scale, S, NH, SIZE,
              DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr,
              USE_G: tl.constexpr, HAS_S0: tl.constexpr, STORE_END: tl.constexpr, PREC: tl.constexpr):
    """Outputs of one segment and DV slice, chunk by chunk with the state [DK, BV] in registers (fp32): attention
    inside each chunk plus the query times the state entering it. S0: state entering the segment; END: leaving it."""
    iv, pid = tl.program_id(0), tl.program_id(1).to(tl.int64)
    j, h = pid // NH, pid % NH
    b = tl.load(SEG_B + j).to(tl.int64)
    start = tl.load(SEG_START + j).to(tl.int64)
    length = tl.load(SEG_LEN + j)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BKF)
    rv = iv * BV + tl.arange(0, BV)
    mk, mv = rk < DK, rv < DV
    bh = b * NH + h
    off = rk[:, None] * DV + rv[None, :]
    mstate = mk[:, None] & mv[None, :]
    state = tl.zeros([BKF, BV], dtype=tl.float32)
    if HAS_S0:
        state += tl.load(S0 + pid * DK * DV + off, mask=mstate, other=0.0)
    causal = rc[:, None] >= rc[None, :]
    for c in range(tl.cdiv(length, C)):
        valid = c * C + rc < length
        t = start + c * C + rc
        mqk = valid[:, None] & mk[None, :]
        mcv = valid[:, None] & mv[None, :]
        q = tl.load(Q + (bh * S + t[:, None]) * DK + rk[None, :], mask=mqk, other=0.0)
        k = tl.load(K + (bh * S + t[:, None]) * DK + rk[None, :], mask=mqk, other=0.0)
        v = tl.load(V + (bh * S + t[:, None]) * DV + rv[None, :], mask=mcv, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PREC)
        if USE_G:
            g = tl.load(G + bh * S + t, mask=valid, other=0.0)
            cum = tl.cumsum(g, 0)
            total = tl.sum(g, 0)
            scores = scores * tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
            q = (q * tl.exp(cum)[:, None]).to(v.dtype)
            k = (k * tl.exp(total - cum)[:, None]).to(v.dtype)
        else:
            scores = tl.where(causal, scores, 0.0)
        o = tl.dot(q, state.to(v.dtype), input_precision=PREC)
        o += tl.dot(scores.to(v.dtype), v, input_precision=PREC)
        tl.store(OUT + (bh * S + t[:, None]) * DV + rv[None, :], (o * scale).to(OUT.dtype.element_ty), mask=mcv)
        if USE_G:
            state = state * tl.exp(total)
        state += tl.dot(tl.trans(k), v, input_precision=PREC)
    if STORE_END:
        tl.store(END + pid * DK * DV + off, state, mask=mstate)


@triton.autotune(_walk_configs("BK"), key=["DK", "DV", "C", "USE_G", "G_GRAD", "HAS_S0", "SIZE"],
                 prune_configs_by=_PRUNE, pre_hook=_zero_dgl)
@triton.jit(do_not_specialize=["SIZE"])
def _dq_walk(Q, K, V, G, DO, S0, DQ, DGL, SEG_B, SEG_START, SEG_LEN, scale, S, NH, SIZE,
             DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BVF: tl.constexpr,
             USE_G: tl.constexpr, HAS_S0: tl.constexpr, G_GRAD: tl.constexpr, PREC: tl.constexpr):
    """dq of one segment and DK slice, walking forwards with the state [BK, DV] in registers (fp32); with G_GRAD,
    adds the slice's q·dq to DGL (the log-decay gradient's query term, per token)."""
    ik, pid = tl.program_id(0), tl.program_id(1).to(tl.int64)
    j, h = pid // NH, pid % NH
    b = tl.load(SEG_B + j).to(tl.int64)
    start = tl.load(SEG_START + j).to(tl.int64)
    length = tl.load(SEG_LEN + j)
    rc = tl.arange(0, C)
    rk = ik * BK + tl.arange(0, BK)
    rv = tl.arange(0, BVF)
    mk, mv = rk < DK, rv < DV
    bh = b * NH + h
    mstate = mk[:, None] & mv[None, :]
    state = tl.zeros([BK, BVF], dtype=tl.float32)
    if HAS_S0:
        state += tl.load(S0 + pid * DK * DV + rk[:, None] * DV + rv[None, :], mask=mstate, other=0.0)
    causal = rc[:, None] >= rc[None, :]
    for c in range(tl.cdiv(length, C)):
        valid = c * C + rc < length
        t = start + c * C + rc
        mck = valid[:, None] & mk[None, :]
        mcv = valid[:, None] & mv[None, :]
        k = tl.load(K + (bh * S + t[:, None]) * DK + rk[None, :], mask=mck, other=0.0)
        v = tl.load(V + (bh * S + t[:, None]) * DV + rv[None, :], mask=mcv, other=0.0)
        do = tl.load(DO + (bh * S + t[:, None]) * DV + rv[None, :], mask=mcv, other=0.0)
        d_scores = tl.dot(do, tl.trans(v), input_precision=PREC)
        inter = tl.dot(do, tl.trans(state.to(do.dtype)), input_precision=PREC)
        if USE_G:
            g = tl.load(G + bh * S + t, mask=valid, other=0.0)
            cum = tl.cumsum(g, 0)
            total = tl.sum(g, 0)
            d_scores = d_scores * tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
            inter = inter * tl.exp(cum)[:, None]
            state = state * tl.exp(total)
            k_in = (k * tl.exp(total - cum)[:, None]).to(v.dtype)
        else:
            d_scores = tl.where(causal, d_scores, 0.0)
            k_in = k
        dq = (tl.dot(d_scores.to(k.dtype), k, input_precision=PREC) + inter) * scale
        tl.store(DQ + (bh * S + t[:, None]) * DK + rk[None, :], dq.to(DQ.dtype.element_ty), mask=mck)
        if G_GRAD:
            q = tl.load(Q + (bh * S + t[:, None]) * DK + rk[None, :], mask=mck, other=0.0)
            tl.atomic_add(DGL + bh * S + t, tl.sum(q.to(tl.float32) * dq, 1), mask=valid)
        state += tl.dot(tl.trans(k_in), v, input_precision=PREC)


@triton.autotune(_walk_configs("BK"), key=["DK", "DV", "C", "USE_G", "G_GRAD", "HAS_D0", "STORE_END", "SIZE"],
                 prune_configs_by=_PRUNE, pre_hook=_zero_dgl)
@triton.jit(do_not_specialize=["SIZE"])
def _dk_walk(Q, K, V, G, DO, D0, DK_, DGL, END, SEG_B, SEG_START, SEG_LEN, scale, S, NH, SIZE,
             DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BVF: tl.constexpr,
             USE_G: tl.constexpr, HAS_D0: tl.constexpr, G_GRAD: tl.constexpr, STORE_END: tl.constexpr,
             PREC: tl.constexpr):
    """dk of one segment and DK slice, walking backwards with the state gradient [BK, DV] in registers (fp32). D0:
    the gradient leaving the segment; END: the gradient entering it. With G_GRAD, adds the slice's k·dk to DGL."""
    ik, pid = tl.program_id(0), tl.program_id(1).to(tl.int64)
    j, h = pid // NH, pid % NH
    b = tl.load(SEG_B + j).to(tl.int64)
    start = tl.load(SEG_START + j).to(tl.int64)
    length = tl.load(SEG_LEN + j)
    rc = tl.arange(0, C)
    rk = ik * BK + tl.arange(0, BK)
    rv = tl.arange(0, BVF)
    mk, mv = rk < DK, rv < DV
    bh = b * NH + h
    off = rk[:, None] * DV + rv[None, :]
    mstate = mk[:, None] & mv[None, :]
    dstate = tl.zeros([BK, BVF], dtype=tl.float32)
    if HAS_D0:
        dstate += tl.load(D0 + pid * DK * DV + off, mask=mstate, other=0.0)
    causal = rc[:, None] >= rc[None, :]
    nch = tl.cdiv(length, C)
    for i in range(nch):
        c = nch - 1 - i
        valid = c * C + rc < length
        t = start + c * C + rc
        mck = valid[:, None] & mk[None, :]
        mcv = valid[:, None] & mv[None, :]
        q = tl.load(Q + (bh * S + t[:, None]) * DK + rk[None, :], mask=mck, other=0.0)
        v = tl.load(V + (bh * S + t[:, None]) * DV + rv[None, :], mask=mcv, other=0.0)
        do = tl.load(DO + (bh * S + t[:, None]) * DV + rv[None, :], mask=mcv, other=0.0)
        d_scores = tl.dot(do, tl.trans(v), input_precision=PREC)
        inter = tl.dot(v, tl.trans(dstate.to(v.dtype)), input_precision=PREC)
        if USE_G:
            g = tl.load(G + bh * S + t, mask=valid, other=0.0)
            cum = tl.cumsum(g, 0)
            total = tl.sum(g, 0)
            d_scores = d_scores * tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
            inter = inter * tl.exp(total - cum)[:, None]
            dstate = dstate * tl.exp(total)
            q_in = (q * tl.exp(cum)[:, None]).to(v.dtype)
        else:
            d_scores = tl.where(causal, d_scores, 0.0)
            q_in = q
        dk = tl.dot(tl.trans(d_scores.to(q.dtype)), q, input_precision=PREC) * scale + inter
        tl.store(DK_ + (bh * S + t[:, None]) * DK + rk[None, :], dk.to(DK_.dtype.element_ty), mask=mck)
        if G_GRAD:
            k = tl.load(K + (bh * S + t[:, None]) * DK + rk[None, :], mask=mck, other=0.0)
            tl.atomic_add(DGL + bh * S + t, tl.sum(k.to(tl.float32) * dk, 1), mask=valid)
        dstate += scale * tl.dot(tl.trans(q_in), do, input_precision=PREC)
    if STORE_END:
        tl.store(END + pid * DK * DV + off, dstate, mask=mstate)


@triton.autotune(_walk_configs("BV"), key=["DK", "DV", "C", "USE_G", "HAS_D0", "SIZE"], prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["SIZE"])
def _dv_walk(Q, K, G, DO, D0, DV_, SEG_B, SEG_START, SEG_LEN, scale, S, NH, SIZE,
             DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr,
             USE_G: tl.constexpr, HAS_D0: tl.constexpr, PREC: tl.constexpr):
    """dv of one segment and DV slice, walking backwards with the state gradient [DK, BV] in registers (fp32)."""
    iv, pid = tl.program_id(0), tl.program_id(1).to(tl.int64)
    j, h = pid // NH, pid % NH
    b = tl.load(SEG_B + j).to(tl.int64)
    start = tl.load(SEG_START + j).to(tl.int64)
    length = tl.load(SEG_LEN + j)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BKF)
    rv = iv * BV + tl.arange(0, BV)
    mk, mv = rk < DK, rv < DV
    bh = b * NH + h
    mstate = mk[:, None] & mv[None, :]
    dstate = tl.zeros([BKF, BV], dtype=tl.float32)
    if HAS_D0:
        dstate += tl.load(D0 + pid * DK * DV + rk[:, None] * DV + rv[None, :], mask=mstate, other=0.0)
    anticausal = rc[:, None] <= rc[None, :]  # [s, t]: key s, query t
    nch = tl.cdiv(length, C)
    for i in range(nch):
        c = nch - 1 - i
        valid = c * C + rc < length
        t = start + c * C + rc
        mqk = valid[:, None] & mk[None, :]
        mcv = valid[:, None] & mv[None, :]
        q = tl.load(Q + (bh * S + t[:, None]) * DK + rk[None, :], mask=mqk, other=0.0)
        k = tl.load(K + (bh * S + t[:, None]) * DK + rk[None, :], mask=mqk, other=0.0)
        do = tl.load(DO + (bh * S + t[:, None]) * DV + rv[None, :], mask=mcv, other=0.0)
        scores_t = tl.dot(k, tl.trans(q), input_precision=PREC)
        inter = tl.dot(k, dstate.to(k.dtype), input_precision=PREC)
        if USE_G:
            g = tl.load(G + bh * S + t, mask=valid, other=0.0)
            cum = tl.cumsum(g, 0)
            total = tl.sum(g, 0)
            scores_t = scores_t * tl.exp(tl.where(anticausal, cum[None, :] - cum[:, None], float("-inf")))
            inter = inter * tl.exp(total - cum)[:, None]
            dstate = dstate * tl.exp(total)
            q = (q * tl.exp(cum)[:, None]).to(k.dtype)
        else:
            scores_t = tl.where(anticausal, scores_t, 0.0)
        dv = tl.dot(scores_t.to(do.dtype), do, input_precision=PREC) * scale + inter
        tl.store(DV_ + (bh * S + t[:, None]) * DV + rv[None, :], dv.to(DV_.dtype.element_ty), mask=mcv)
        dstate += scale * tl.dot(tl.trans(q), do, input_precision=PREC)


@triton.jit
def _recurrent_step(Q, K, V, G, S0, OUT, ST, scale, T, NH, DK: tl.constexpr, DV: tl.constexpr,
                    BKF: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr):
    """T tokens from a state, one (batch·head, DV slice) per program: the state stays in registers (fp32)."""
    iv, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rk = tl.arange(0, BKF)
    rv = iv * BV + tl.arange(0, BV)
    mk, mv = rk < DK, rv < DV
    state_ptr = bh * DK * DV + rk[:, None] * DV + rv[None, :]
    mstate = mk[:, None] & mv[None, :]
    state = tl.load(S0 + state_ptr, mask=mstate, other=0.0).to(tl.float32)
    for i in range(T):
        q = tl.load(Q + (bh * T + i) * DK + rk, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(K + (bh * T + i) * DK + rk, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(V + (bh * T + i) * DV + rv, mask=mv, other=0.0).to(tl.float32)
        if USE_G:
            state = state * tl.exp(tl.load(G + bh * T + i))
        state += k[:, None] * v[None, :]
        o = tl.sum(q[:, None] * state, 0) * scale
        tl.store(OUT + (bh * T + i) * DV + rv, o.to(OUT.dtype.element_ty), mask=mv)
    tl.store(ST + state_ptr, state, mask=mstate)


TARGET_ROWS = 256  # (segment, head) rows the walk kernels want at least; fewer sequences are split into segments
MIN_SEGMENT_CHUNKS = 16
PIECE_CHUNKS = 128  # split sequences: the state pass works on pieces this long (many programs, short scan)


def segment_chunks_for(n_seq: int, heads: int, max_chunks: int) -> int:
    """Chunks per segment: whole sequences when there are enough (sequence, head) rows to fill the GPU, else
    sequences cut into equal segments until there are about TARGET_ROWS rows (never below MIN_SEGMENT_CHUNKS)."""
    splits = -(-TARGET_ROWS // max(1, n_seq * heads))
    return max(1, max_chunks if splits <= 1 else max(MIN_SEGMENT_CHUNKS, -(-max_chunks // splits)))


def _cut(lens: Tensor, starts: Tensor, rows: Tensor, chunk: int, per: int) -> tuple[Tensor, ...]:
    """Sequences cut into parts of ``per`` chunks (an empty sequence: one empty part): each sequence's first part
    and number of parts, each part's batch row, first token and length."""
    n = (((lens + chunk - 1) // chunk + per - 1) // per).clamp_min(1)
    first = torch.cumsum(n, 0) - n
    seq_of = torch.repeat_interleave(torch.arange(len(lens)), n)
    index = torch.arange(int(n.sum())) - first[seq_of]
    tokens = per * chunk
    return first, n, rows[seq_of], starts[seq_of] + index * tokens, (lens[seq_of] - index * tokens).clamp(0, tokens)


class Plan:
    """Sequence tables for one call: batch rows or packed cu_seqlens sequences, each cut into segments of whole
    chunks that the walk kernels process in parallel (one segment per sequence when rows are plentiful). Split
    sequences are also cut into shorter pieces for the state pass, a whole number of pieces per segment."""

    def __init__(self, batch: int, seq: int, heads: int, cu_seqlens: Tensor | None, chunk: int,
                 device: torch.device):
        if cu_seqlens is None:
            lens = torch.full((batch,), seq, dtype=torch.int64)
            starts = torch.zeros(batch, dtype=torch.int64)
            rows = torch.arange(batch)
        else:
            cu = cu_seqlens.to("cpu", torch.int64)
            lens, starts = cu[1:] - cu[:-1], cu[:-1]
            rows = torch.zeros(len(lens), dtype=torch.int64)
        max_chunks = int((lens.max() + chunk - 1) // chunk) if len(lens) else 1
        seg_chunks = segment_chunks_for(len(lens), heads, max_chunks)
        piece_chunks = min(seg_chunks, PIECE_CHUNKS)
        seg_chunks = -(-seg_chunks // piece_chunks) * piece_chunks
        seg0, nseg, *segs = _cut(lens, starts, rows, chunk, seg_chunks)
        self.n_seq, self.n_segs = len(lens), int(nseg.sum())
        self.split = self.n_segs > self.n_seq  # some sequence has several segments: carry states between them
        to = dict(device=device, dtype=torch.int32)
        self.segs = [x.to(**to) for x in segs]
        if self.split:
            piece0, npiece, *pieces = _cut(lens, starts, rows, chunk, piece_chunks)
            per = seg_chunks // piece_chunks
            seq_of_seg = torch.repeat_interleave(torch.arange(self.n_seq), nseg)
            first = piece0[seq_of_seg] + (torch.arange(self.n_segs) - seg0[seq_of_seg]) * per
            last = torch.minimum(first + per, (piece0 + npiece)[seq_of_seg]) - 1
            self.n_pieces, self.pieces = int(npiece.sum()), [x.to(**to) for x in pieces]
            self.seqs = [x.to(**to) for x in (piece0, npiece)]
            self.first_piece, self.last_piece = first.to(device), last.to(device)
        self.walk_size = _size_class(self.n_segs * heads, seg_chunks * chunk)
        self.state_size = _size_class(self.n_pieces * heads, piece_chunks * chunk) if self.split else 0
        self.starts, self.lens = starts.to(device), lens.to(device)
        self.last_token = (starts + lens - 1)[lens > 0]  # per non-empty sequence, for the final-state term of dg
        self.last_rows, self.nonempty = rows[lens > 0], lens > 0
        self.chunk = chunk


def _size_class(programs: int, tokens: int) -> int:
    """Autotuning key for a launch's size: log2 buckets of its (part, head) programs and of the tokens each walks.
    Without it, the first shape tuned a kernel for all later ones (a 2k check's split call picked the tile that a
    1M-token call then ran 1.5x slower with)."""
    return programs.bit_length() * 64 + tokens.bit_length()


@functools.lru_cache(maxsize=32)
def _dense_plan(batch: int, seq: int, heads: int, chunk: int, device: torch.device, _sizes: tuple) -> Plan:
    return Plan(batch, seq, heads, None, chunk, device)


def plan_for(batch: int, seq: int, heads: int, cu_seqlens: Tensor | None, chunk: int, device: torch.device) -> Plan:
    """The call's Plan; for equal-length batches one per shape (and segment sizes), built once: building one costs
    host work and blocking copies of its tables to the GPU (~1 ms, which stalls the stream at 1M tokens)."""
    if cu_seqlens is None:
        return _dense_plan(batch, seq, heads, chunk, device, (TARGET_ROWS, MIN_SEGMENT_CHUNKS, PIECE_CHUNKS))
    return Plan(batch, seq, heads, cu_seqlens, chunk, device)


def _prec(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _carry(x: Tensor, y: Tensor, g: Tensor | None, init: Tensor | None, plan: Plan, *, reverse: bool,
           scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """States at piece boundaries, fp32 [pieces, H, DK, DV]: forward (x, y = k, v; init = h0) the state entering
    every piece, and the final states; reverse (x, y = q, do; init = dht) the gradient leaving every piece, and
    d h0."""
    B, H, S, DK = x.shape
    DV = y.shape[-1]
    local = x.new_empty(plan.n_pieces, H, DK, DV, dtype=torch.float32)
    tot = x.new_empty(plan.n_pieces, H, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(DK, meta["BK"]), triton.cdiv(DV, meta["BV"]), plan.n_pieces * H)  # noqa: E731
    _piece_state[grid](x, y, g, local, tot, *plan.pieces, scale, S, H, plan.state_size, DK=DK, DV=DV,
                       USE_G=g is not None, REVERSE=reverse, PREC=_prec(x))
    carry, final = torch.empty_like(local), x.new_empty(plan.n_seq, H, DK, DV, dtype=torch.float32)
    BK, BV = min(32, max(16, triton.next_power_of_2(DK))), min(32, max(16, triton.next_power_of_2(DV)))
    _piece_scan[(triton.cdiv(DK, BK), triton.cdiv(DV, BV), plan.n_seq * H)](
        local, tot, init, carry, final, *plan.seqs, H, DK=DK, DV=DV, BK=BK, BV=BV, USE_G=g is not None,
        HAS_INIT=init is not None, REVERSE=reverse)
    return carry, final


def chunk_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, h0: Tensor | None, scale: float,
              plan: Plan) -> tuple[Tensor, Tensor, Tensor | None]:
    """Forward on contiguous [B, H, S, D] inputs: (o, final states fp32 [N, H, DK, DV], the states entering every
    segment when sequences are split, else None)."""
    B, H, S, DK = q.shape
    DV = v.shape[-1]
    o = torch.empty_like(v)
    if plan.split:
        carry, ht = _carry(k, v, g, h0, plan, reverse=False)
        s0 = carry[plan.first_piece]
    else:
        s0, ht = h0, q.new_empty(plan.n_seq, H, DK, DV, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(DV, meta["BV"]), plan.n_segs * H)  # noqa: E731
    _fwd_walk[grid](q, k, v, g, s0, o, ht, *plan.segs, scale, S, H, plan.walk_size, DK=DK, DV=DV, C=plan.chunk,
                    BKF=max(16, triton.next_power_of_2(DK)), USE_G=g is not None, HAS_S0=s0 is not None,
                    STORE_END=not plan.split, PREC=_prec(q))
    return o, ht, (s0 if plan.split else None)


def chunk_bwd(q, k, v, g, h0, carry, scale, plan: Plan, do, dht, g_grad: bool):
    """Backward: (dq, dk, dv, dgl [B, H, S] fp32 or None, dh0 fp32). ``carry``: chunk_fwd's segment states."""
    B, H, S, DK = q.shape
    DV = v.shape[-1]
    if plan.split:
        dcarry, dh0 = _carry(q, do, g, dht, plan, reverse=True, scale=scale)
        d0 = dcarry[plan.last_piece]
    else:
        d0, dh0 = dht, q.new_empty(plan.n_seq, H, DK, DV, dtype=torch.float32)
    s0 = carry if plan.split else h0
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dgq, dgk = ((torch.zeros(B, H, S, dtype=torch.float32, device=q.device) for _ in range(2)) if g_grad
                else (None, None))
    common = dict(DK=DK, DV=DV, C=plan.chunk, USE_G=g is not None, PREC=_prec(q))
    bkf, bvf = max(16, triton.next_power_of_2(DK)), max(16, triton.next_power_of_2(DV))
    k_grid = lambda meta: (triton.cdiv(DK, meta["BK"]), plan.n_segs * H)  # noqa: E731
    v_grid = lambda meta: (triton.cdiv(DV, meta["BV"]), plan.n_segs * H)  # noqa: E731
    size = plan.walk_size
    _dq_walk[k_grid](q, k, v, g, do, s0, dq, dgq, *plan.segs, scale, S, H, size, BVF=bvf, HAS_S0=s0 is not None,
                     G_GRAD=g_grad, **common)
    _dk_walk[k_grid](q, k, v, g, do, d0, dk, dgk, dh0, *plan.segs, scale, S, H, size, BVF=bvf, HAS_D0=d0 is not None,
                     G_GRAD=g_grad, STORE_END=not plan.split, **common)
    _dv_walk[v_grid](q, k, g, do, d0, dv, *plan.segs, scale, S, H, size, BKF=bkf, HAS_D0=d0 is not None, **common)
    return dq, dk, dv, (dgq - dgk if g_grad else None), dh0


def recurrent_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, state: Tensor, scale: float):
    """Decode T tokens ([B, H, T, D], contiguous) from ``state`` fp32 [B, H, DK, DV]: (o, new state)."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    o = torch.empty_like(v)
    new_state = torch.empty_like(state)
    BV = min(64, max(16, triton.next_power_of_2(DV)))
    _recurrent_step[(triton.cdiv(DV, BV), B * H)](q, k, v, g, state, o, new_state, scale, T, H, DK=DK, DV=DV,
                                                  BKF=max(16, triton.next_power_of_2(DK)), BV=BV,
                                                  USE_G=g is not None)
    return o, new_state
