"""Triton kernels for causal linear attention (semantics in ``linear_reference``).

Chunked form, as in Lightning Attention-2 and flash-linear-attention: a sequential *state* kernel walks each
sequence chunk by chunk and writes the state at every chunk start (fp32 accumulation, stored in the inputs' dtype
for the tensor-core dot that reads it); a fully parallel *output* kernel then combines softmax-free attention inside
each chunk with the query times its chunk's start state. The backward mirrors it: a reverse state kernel for the
state gradient at every chunk end, then one parallel kernel for dq, dk, dv (and the log-decay's per-token term).
Sequences (batch rows or packed ``cu_seqlens`` segments) are described by small tables, so one code path serves both.
A fused recurrent kernel decodes a few tokens from a state.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _state_configs() -> list[triton.Config]:
    """State kernels: small state tiles give more programs for the sequential walk (B·H is small at 1M tokens)."""
    if INTERPRET:
        return [triton.Config({"BK": 16, "BV": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s)
            for bk in (32, 64) for bv in (32, 64) for w in (2, 4) for s in (2, 3)]


def _out_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BV": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv in (64, 128) for w in (4, 8) for s in (2, 3)]


def _prune_tiles(configs, named_args, **kwargs):
    """Tiles no wider than the (power-of-two padded) head dims; at least one config survives."""
    args = {**named_args, **kwargs}
    dk, dv = args["DK"], args["DV"]
    kept = [c for c in configs if c.kwargs.get("BK", 16) <= max(16, triton.next_power_of_2(dk))
            and c.kwargs["BV"] <= max(16, triton.next_power_of_2(dv))]
    return kept or [min(configs, key=lambda c: c.kwargs["BV"])]


_PRUNE = {"early_config_prune": _prune_tiles}


@triton.autotune(_state_configs(), key=["DK", "DV", "C", "USE_G"], prune_configs_by=_PRUNE)
@triton.jit
def _state_fwd(K, V, G, H0, HS, HT, SEQ_B, SEQ_START, SEQ_LEN, SEQ_CHUNK0, S, NH,
               DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               USE_G: tl.constexpr, HAS_H0: tl.constexpr, PREC: tl.constexpr):
    """State at the start of every chunk into HS [chunks, H, DK, DV]; the final state (fp32) into HT."""
    ik, iv, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, h = pid // NH, pid % NH
    b = tl.load(SEQ_B + n).to(tl.int64)
    start = tl.load(SEQ_START + n).to(tl.int64)
    length = tl.load(SEQ_LEN + n)
    c0 = tl.load(SEQ_CHUNK0 + n).to(tl.int64)
    rk = ik * BK + tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    mk, mv = rk < DK, rv < DV
    bh = b * NH + h
    state_off = rk[:, None] * DV + rv[None, :]
    mstate = mk[:, None] & mv[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(H0 + (n * NH + h) * DK * DV + state_off, mask=mstate, other=0.0)
    for c in range(tl.cdiv(length, C)):
        tl.store(HS + ((c0 + c) * NH + h) * DK * DV + state_off, state.to(HS.dtype.element_ty), mask=mstate)
        valid = c * C + rc < length
        t = start + c * C + rc
        kt = tl.load(K + (bh * S + t[None, :]) * DK + rk[:, None], mask=mk[:, None] & valid[None, :], other=0.0)
        vv = tl.load(V + (bh * S + t[:, None]) * DV + rv[None, :], mask=valid[:, None] & mv[None, :], other=0.0)
        if USE_G:
            g = tl.load(G + bh * S + t, mask=valid, other=0.0)
            cum = tl.cumsum(g, 0)
            total = tl.sum(g, 0)
            kt = (kt * tl.exp(total - cum)[None, :]).to(vv.dtype)
            state = state * tl.exp(total)
        state += tl.dot(kt, vv, input_precision=PREC)
    tl.store(HT + (n * NH + h) * DK * DV + state_off, state, mask=mstate)


@triton.autotune(_out_configs(), key=["DK", "DV", "C", "USE_G"], prune_configs_by=_PRUNE)
@triton.jit
def _out_fwd(Q, K, V, G, HS, OUT, CH_B, CH_START, CH_LEN, scale, S, NH,
             DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr,
             USE_G: tl.constexpr, PREC: tl.constexpr):
    """o = scale · (decayed q · start state + (decay-masked q kᵀ) v) for one chunk and one slice of DV."""
    iv, ic, h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    b = tl.load(CH_B + ic).to(tl.int64)
    start = tl.load(CH_START + ic).to(tl.int64)
    length = tl.load(CH_LEN + ic)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BKF)
    rv = iv * BV + tl.arange(0, BV)
    valid = rc < length
    mk, mv = rk < DK, rv < DV
    bh = b * NH + h
    t = start + rc
    q = tl.load(Q + (bh * S + t[:, None]) * DK + rk[None, :], mask=valid[:, None] & mk[None, :], other=0.0)
    k = tl.load(K + (bh * S + t[:, None]) * DK + rk[None, :], mask=valid[:, None] & mk[None, :], other=0.0)
    v = tl.load(V + (bh * S + t[:, None]) * DV + rv[None, :], mask=valid[:, None] & mv[None, :], other=0.0)
    hs = tl.load(HS + (ic * NH + h) * DK * DV + rk[:, None] * DV + rv[None, :], mask=mk[:, None] & mv[None, :],
                 other=0.0)
    causal = rc[:, None] >= rc[None, :]
    scores = tl.dot(q, tl.trans(k), input_precision=PREC)
    if USE_G:
        cum = tl.cumsum(tl.load(G + bh * S + t, mask=valid, other=0.0), 0)
        scores = scores * tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
        q = (q * tl.exp(cum)[:, None]).to(v.dtype)
    else:
        scores = tl.where(causal, scores, 0.0)
    o = tl.dot(q, hs, input_precision=PREC) + tl.dot(scores.to(v.dtype), v, input_precision=PREC)
    tl.store(OUT + (bh * S + t[:, None]) * DV + rv[None, :], (o * scale).to(OUT.dtype.element_ty),
             mask=valid[:, None] & mv[None, :])


@triton.autotune(_state_configs(), key=["DK", "DV", "C", "USE_G"], prune_configs_by=_PRUNE)
@triton.jit
def _state_bwd(Q, DO, G, DHT, DH0, DHS, SEQ_B, SEQ_START, SEQ_LEN, SEQ_CHUNK0, scale, S, NH,
               DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               USE_G: tl.constexpr, HAS_DHT: tl.constexpr, PREC: tl.constexpr):
    """Gradient of the state at the end of every chunk into DHS (walking backwards); d(initial state) into DH0."""
    ik, iv, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, h = pid // NH, pid % NH
    b = tl.load(SEQ_B + n).to(tl.int64)
    start = tl.load(SEQ_START + n).to(tl.int64)
    length = tl.load(SEQ_LEN + n)
    c0 = tl.load(SEQ_CHUNK0 + n).to(tl.int64)
    rk = ik * BK + tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    mk, mv = rk < DK, rv < DV
    bh = b * NH + h
    state_off = rk[:, None] * DV + rv[None, :]
    mstate = mk[:, None] & mv[None, :]
    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dstate += tl.load(DHT + (n * NH + h) * DK * DV + state_off, mask=mstate, other=0.0)
    nchunks = tl.cdiv(length, C)
    for i in range(nchunks):
        c = nchunks - 1 - i
        tl.store(DHS + ((c0 + c) * NH + h) * DK * DV + state_off, dstate.to(DHS.dtype.element_ty), mask=mstate)
        valid = c * C + rc < length
        t = start + c * C + rc
        qt = tl.load(Q + (bh * S + t[None, :]) * DK + rk[:, None], mask=mk[:, None] & valid[None, :], other=0.0)
        do = tl.load(DO + (bh * S + t[:, None]) * DV + rv[None, :], mask=valid[:, None] & mv[None, :], other=0.0)
        if USE_G:
            g = tl.load(G + bh * S + t, mask=valid, other=0.0)
            cum = tl.cumsum(g, 0)
            qt = (qt * tl.exp(cum)[None, :]).to(do.dtype)
            dstate = dstate * tl.exp(tl.sum(g, 0))
        dstate += scale * tl.dot(qt, do, input_precision=PREC)
    tl.store(DH0 + (n * NH + h) * DK * DV + state_off, dstate, mask=mstate)


@triton.autotune(_out_configs(), key=["DK", "DV", "C", "USE_G", "G_GRAD"], prune_configs_by=_PRUNE)
@triton.jit
def _chunk_bwd(Q, K, V, G, HS, DHS, DO, DQ, DK_, DV_, DGL, CH_B, CH_START, CH_LEN, scale, S, NH,
               DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr,
               USE_G: tl.constexpr, G_GRAD: tl.constexpr, PREC: tl.constexpr):
    """dq, dk, dv of one chunk (DV walked in slices); with G_GRAD, q·dq − k·dk per token (the log-decay gradient
    before its reverse cumulative sum)."""
    ic, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b = tl.load(CH_B + ic).to(tl.int64)
    start = tl.load(CH_START + ic).to(tl.int64)
    length = tl.load(CH_LEN + ic)
    rc = tl.arange(0, C)
    rk = tl.arange(0, BKF)
    valid = rc < length
    mk = rk < DK
    bh = b * NH + h
    t = start + rc
    mqk = valid[:, None] & mk[None, :]
    q = tl.load(Q + (bh * S + t[:, None]) * DK + rk[None, :], mask=mqk, other=0.0)
    k = tl.load(K + (bh * S + t[:, None]) * DK + rk[None, :], mask=mqk, other=0.0)
    causal = rc[:, None] >= rc[None, :]
    if USE_G:
        g = tl.load(G + bh * S + t, mask=valid, other=0.0)
        cum = tl.cumsum(g, 0)
        total = tl.sum(g, 0)
        pair = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
        decay_in = tl.exp(cum)
        decay_out = tl.exp(total - cum)
    else:
        pair = tl.where(causal, 1.0, 0.0)
        decay_in = tl.full([C], 1.0, tl.float32)
        decay_out = tl.full([C], 1.0, tl.float32)
    scores_t = (tl.dot(k, tl.trans(q), input_precision=PREC) * tl.trans(pair) * scale).to(q.dtype)  # [j, i]
    d_scores = tl.zeros([C, C], dtype=tl.float32)
    dq_state = tl.zeros([C, BKF], dtype=tl.float32)
    dk_state = tl.zeros([C, BKF], dtype=tl.float32)
    state_base = (ic * NH + h) * DK * DV
    for iv in range(tl.cdiv(DV, BV)):
        rv = iv * BV + tl.arange(0, BV)
        mv = rv < DV
        mcv = valid[:, None] & mv[None, :]
        v = tl.load(V + (bh * S + t[:, None]) * DV + rv[None, :], mask=mcv, other=0.0)
        do = tl.load(DO + (bh * S + t[:, None]) * DV + rv[None, :], mask=mcv, other=0.0)
        mkv = mk[:, None] & mv[None, :]
        hs = tl.load(HS + state_base + rk[:, None] * DV + rv[None, :], mask=mkv, other=0.0)
        dhs = tl.load(DHS + state_base + rk[:, None] * DV + rv[None, :], mask=mkv, other=0.0)
        d_scores += tl.dot(do, tl.trans(v), input_precision=PREC)
        dq_state += tl.dot(do, tl.trans(hs), input_precision=PREC)
        dk_state += tl.dot(v, tl.trans(dhs), input_precision=PREC)
        dv = tl.dot(scores_t, do, input_precision=PREC)
        dv += decay_out[:, None] * tl.dot(k, dhs, input_precision=PREC)
        tl.store(DV_ + (bh * S + t[:, None]) * DV + rv[None, :], dv.to(DV_.dtype.element_ty), mask=mcv)
    d_scores = (d_scores * pair * scale).to(q.dtype)
    dq = tl.dot(d_scores, k, input_precision=PREC) + (scale * decay_in)[:, None] * dq_state
    dk = tl.dot(tl.trans(d_scores), q, input_precision=PREC) + decay_out[:, None] * dk_state
    tl.store(DQ + (bh * S + t[:, None]) * DK + rk[None, :], dq.to(DQ.dtype.element_ty), mask=mqk)
    tl.store(DK_ + (bh * S + t[:, None]) * DK + rk[None, :], dk.to(DK_.dtype.element_ty), mask=mqk)
    if G_GRAD:
        dgl = tl.sum(q.to(tl.float32) * dq - k.to(tl.float32) * dk, 1)
        tl.store(DGL + bh * S + t, dgl, mask=valid)


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


class Plan:
    """Sequence and chunk tables for one call: batch rows or packed cu_seqlens segments, cut into chunks."""

    def __init__(self, batch: int, seq: int, cu_seqlens: Tensor | None, chunk: int, device: torch.device):
        if cu_seqlens is None:
            lens = torch.full((batch,), seq, dtype=torch.int64)
            starts = torch.zeros(batch, dtype=torch.int64)
            rows = torch.arange(batch)
        else:
            cu = cu_seqlens.to("cpu", torch.int64)
            lens, starts = cu[1:] - cu[:-1], cu[:-1]
            rows = torch.zeros(len(lens), dtype=torch.int64)
        per_seq = (lens + chunk - 1) // chunk
        chunk0 = torch.cumsum(per_seq, 0) - per_seq
        self.n_seq, self.n_chunks = len(lens), int(per_seq.sum())
        seq_of_chunk = torch.repeat_interleave(torch.arange(self.n_seq), per_seq)
        index_in_seq = torch.arange(self.n_chunks) - chunk0[seq_of_chunk]
        ch_start = starts[seq_of_chunk] + index_in_seq * chunk
        ch_len = torch.minimum(lens[seq_of_chunk] - index_in_seq * chunk, torch.tensor(chunk))
        to = dict(device=device, dtype=torch.int32)
        self.seq = [x.to(**to) for x in (rows, starts, lens, chunk0)]
        self.chunks = [x.to(**to) for x in (rows[seq_of_chunk], ch_start, ch_len)]
        self.last_token = (starts + lens - 1)[lens > 0]  # per non-empty sequence, for the final-state term of dg
        self.last_rows, self.nonempty = rows[lens > 0], lens > 0
        self.chunk = chunk


def _prec(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def chunk_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, h0: Tensor | None, scale: float,
              plan: Plan) -> tuple[Tensor, Tensor]:
    """Forward on contiguous [B, H, S, D] inputs: (o, final states fp32 [N, H, DK, DV])."""
    B, H, S, DK = q.shape
    DV = v.shape[-1]
    hs = q.new_empty(max(plan.n_chunks, 1), H, DK, DV)
    ht = q.new_empty(plan.n_seq, H, DK, DV, dtype=torch.float32)
    o = torch.empty_like(v)
    _states(k, v, g, h0, hs, ht, plan)
    if plan.n_chunks:
        grid = lambda meta: (triton.cdiv(DV, meta["BV"]), plan.n_chunks, H)  # noqa: E731
        _out_fwd[grid](q, k, v, g, hs, o, *plan.chunks, scale, S, H, DK=DK, DV=DV, C=plan.chunk,
                       BKF=max(16, triton.next_power_of_2(DK)), USE_G=g is not None, PREC=_prec(q))
    return o, ht


def _states(k, v, g, h0, hs, ht, plan: Plan) -> None:
    B, H, S, DK = k.shape
    DV = v.shape[-1]
    grid = lambda meta: (triton.cdiv(DK, meta["BK"]), triton.cdiv(DV, meta["BV"]), plan.n_seq * H)  # noqa: E731
    _state_fwd[grid](k, v, g, h0, hs, ht, *plan.seq, S, H, DK=DK, DV=DV, C=plan.chunk, USE_G=g is not None,
                     HAS_H0=h0 is not None, PREC=_prec(k))


def chunk_bwd(q, k, v, g, h0, scale, plan: Plan, do, dht, g_grad: bool):
    """Backward: (dq, dk, dv, dgl [B, H, S] fp32 or None, dh0 fp32); states recomputed, not stored."""
    B, H, S, DK = q.shape
    DV = v.shape[-1]
    hs = q.new_empty(max(plan.n_chunks, 1), H, DK, DV)
    ht = q.new_empty(plan.n_seq, H, DK, DV, dtype=torch.float32)
    _states(k, v, g, h0, hs, ht, plan)
    dhs = torch.empty_like(hs)
    dh0 = torch.empty_like(ht)
    grid = lambda meta: (triton.cdiv(DK, meta["BK"]), triton.cdiv(DV, meta["BV"]), plan.n_seq * H)  # noqa: E731
    _state_bwd[grid](q, do, g, dht, dh0, dhs, *plan.seq, scale, S, H, DK=DK, DV=DV, C=plan.chunk,
                     USE_G=g is not None, HAS_DHT=dht is not None, PREC=_prec(q))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dgl = torch.zeros(B, H, S, dtype=torch.float32, device=q.device) if g_grad else None
    if plan.n_chunks:
        _chunk_bwd[(plan.n_chunks, H)](q, k, v, g, hs, dhs, do, dq, dk, dv, dgl, *plan.chunks, scale, S, H,
                                       DK=DK, DV=DV, C=plan.chunk, BKF=max(16, triton.next_power_of_2(DK)),
                                       USE_G=g is not None, G_GRAD=g_grad, PREC=_prec(q))
    return dq, dk, dv, dgl, dh0, ht


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
