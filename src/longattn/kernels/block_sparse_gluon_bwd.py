"""Hopper (sm90) block-sparse backward written in Gluon with the forward's layout of work (block_sparse_gluon.py):
a producer partition issues every TMA load into shared-memory rings, two consumer warpgroups own 64 rows each and
hand a slot back through an mbarrier with two arrivals, and the two products that do not depend on each other
(S and dP) go to the tensor cores together so one's softmax step runs while the other computes.

dK/dV, per program (one 128-row kv block of one batch x kv head): K/V halves stay resident; the Q and dO slices
(32 rows at head_dim 128, 64 at 64) of every listed query block of every query head of the group stream through the
ring; Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ, then dV += Pᵀ·dO and dK += dSᵀ·Q. GQA heads are summed in the program (no atomics).
dQ, per program (one 128-row query block of one batch x head, last blocks first): Q and dO halves stay resident,
K/V blocks stream; S = Q·Kᵀ, dP = dO·Vᵀ, dQ += dS·K. Both read the BlockSparse lists and bit tiles as the Triton
kernels do (block_sparse._bwd_dq_kernel / _bwd_dkdv_kernel), deterministic, equal to them to rounding (tests/gpu).
"""

from __future__ import annotations

from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from longattn.kernels.block_sparse_gluon import BLOCK, LOG2E, descriptor, masked_rows, stream_kv_blocks, transposed_tile
from longattn.masks.block_sparse import BlockSparse

KV_ROWS = BLOCK // 2  # kv rows per consumer warpgroup
# query rows per ring slot, by head_dim: at 128, 64-row slices spill (dK and dV accumulators alone hold 128
# registers per thread; sm_90 compile: 46 local stores at 240 registers)
Q_ROWS = {128: 32, 64: 64}
SLOTS = 4  # Q/dO ring slots
DQ_SLOTS = 2  # K/V ring slots of the dQ kernel: with Q and dO resident, 192 KB of shared memory at head_dim 128


@gluon.jit
def _dkdv_producer(desc_q, desc_do, desc_k, desc_v, desc_dk, desc_dv, q_smem, do_smem, k_smem, v_smem, kv_bars, ready,
                   empty, LSE, DELTA, s_lb, s_lh, IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch, b, hk, kb,
                   GROUP, qk_scale, sm_scale, SEQ_Q):
    """Both K/V halves, then each listed query block's Q and dO slices (QR rows each), head by head."""
    QR: gl.constexpr = desc_q.block_type.shape[2]
    R: gl.constexpr = desc_k.block_type.shape[2]
    SPLIT: gl.constexpr = 2 * R // QR
    NS: gl.constexpr = q_smem.type.shape[0]
    for c in gl.static_range(2):
        mbarrier.expect(kv_bars.index(c), 2 * desc_k.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_k, [b, hk, kb * 2 * R + c * R, 0], kv_bars.index(c), k_smem.index(c))
        tma.async_copy_global_to_shared(desc_v, [b, hk, kb * 2 * R + c * R, 0], kv_bars.index(c), v_smem.index(c))
    t = 0
    for g in range(0, GROUP):
        h = hk * GROUP + g
        row = b.to(gl.int64) * s_ib + h * s_ih + kb * s_im
        n_all = gl.load(CNT + b.to(gl.int64) * s_cb + h * s_ch + kb) * SPLIT
        for j in range(0, n_all):
            slot = t % NS
            mbarrier.wait(empty.index(slot), ((t // NS) & 1) ^ 1)
            q0 = gl.load(IDX + row + j // SPLIT) * 2 * R + (j % SPLIT) * QR
            mbarrier.expect(ready.index(slot), 2 * desc_q.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_q, [b, h, q0, 0], ready.index(slot), q_smem.index(slot))
            tma.async_copy_global_to_shared(desc_do, [b, h, q0, 0], ready.index(slot), do_smem.index(slot))
            t += 1


@gluon.jit
def _dkdv_consumer_lo(desc_q, desc_do, desc_k, desc_v, desc_dk, desc_dv, q_smem, do_smem, k_smem, v_smem, kv_bars,
                      ready, empty, LSE, DELTA, s_lb, s_lh, IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch, b,
                      hk, kb, GROUP, qk_scale, sm_scale, SEQ_Q):
    _dkdv_consume(desc_q, desc_do, desc_k, desc_v, desc_dk, desc_dv, q_smem, do_smem, k_smem, v_smem, kv_bars, ready,
                  empty, LSE, DELTA, s_lb, s_lh, IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch, b, hk, kb,
                  GROUP, qk_scale, sm_scale, SEQ_Q, 0)


@gluon.jit
def _dkdv_consumer_hi(desc_q, desc_do, desc_k, desc_v, desc_dk, desc_dv, q_smem, do_smem, k_smem, v_smem, kv_bars,
                      ready, empty, LSE, DELTA, s_lb, s_lh, IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch, b,
                      hk, kb, GROUP, qk_scale, sm_scale, SEQ_Q):
    _dkdv_consume(desc_q, desc_do, desc_k, desc_v, desc_dk, desc_dv, q_smem, do_smem, k_smem, v_smem, kv_bars, ready,
                  empty, LSE, DELTA, s_lb, s_lh, IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch, b, hk, kb,
                  GROUP, qk_scale, sm_scale, SEQ_Q, 1)


@gluon.jit
def _dkdv_consume(desc_q, desc_do, desc_k, desc_v, desc_dk, desc_dv, q_smem, do_smem, k_smem, v_smem, kv_bars, ready,
                  empty, LSE, DELTA, s_lb, s_lh, IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch, b, hk, kb,
                  GROUP, qk_scale, sm_scale, SEQ_Q, HALF: gl.constexpr):
    """kv rows HALF * 64 .. + 64 of the block: dK and dV accumulate over every listed query slice of every head."""
    QR: gl.constexpr = desc_q.block_type.shape[2]
    R: gl.constexpr = desc_k.block_type.shape[2]
    SPLIT: gl.constexpr = 2 * R // QR
    D: gl.constexpr = desc_q.block_type.shape[3]
    NS: gl.constexpr = q_smem.type.shape[0]
    WORDS: gl.constexpr = 2 * R // 32
    dtype: gl.constexpr = desc_q.dtype
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, QR, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, D, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    col_l: gl.constexpr = gl.SliceLayout(0, st_layout)
    kvrow_l: gl.constexpr = gl.SliceLayout(1, st_layout)
    k = k_smem.index(HALF).reshape([R, D])
    v = v_smem.index(HALF).reshape([R, D])
    dk = gl.zeros([R, D], gl.float32, layout=acc_layout)
    dv = gl.zeros([R, D], gl.float32, layout=acc_layout)
    cols = gl.arange(0, QR, layout=col_l)
    kv_rows = HALF * R + gl.arange(0, R, layout=kvrow_l)
    mbarrier.wait(kv_bars.index(HALF), 0)
    t = 0
    for g in range(0, GROUP):
        h = hk * GROUP + g
        row = b.to(gl.int64) * s_ib + h * s_ih + kb * s_im
        crow = b.to(gl.int64) * s_cb + h * s_ch + kb
        n_full = gl.load(FULL + crow) * SPLIT
        n_all = gl.load(CNT + crow) * SPLIT
        lrow = b.to(gl.int64) * s_lb + h * s_lh
        for j in range(0, n_all):
            slot = t % NS
            q0 = gl.load(IDX + row + j // SPLIT) * 2 * R + (j % SPLIT) * QR
            valid = q0 + cols < SEQ_Q
            lse = gl.load(LSE + lrow + q0 + cols, mask=valid, other=float("inf"))
            lse = gl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
            delta = gl.load(DELTA + lrow + q0 + cols, mask=valid, other=0.0)
            mbarrier.wait(ready.index(slot), (t // NS) & 1)
            qs = q_smem.index(slot).reshape([QR, D])
            dos = do_smem.index(slot).reshape([QR, D])
            s_zero = gl.zeros([R, QR], gl.float32, layout=st_layout)  # made here, not held across the loop
            s_tok = warpgroup_mma(k, qs.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            dp_tok = warpgroup_mma(v, dos.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            st = warpgroup_mma_wait(1, deps=(s_tok,))
            pt = gl.exp2(st * qk_scale - lse[None, :])
            if j >= n_full:  # partial block: transposed bit tile (bits run over kv columns of each query row)
                tile = gl.load(TID + row + j // SPLIT).to(gl.int64)
                qrow = (j % SPLIT) * QR + cols
                words = gl.load(TILES + tile * (2 * R * WORDS) + qrow[None, :] * WORDS + (kv_rows // 32)[:, None])
                pt = gl.where(((words >> (kv_rows % 32)[:, None]) & 1) != 0, pt, 0.0)
            p16 = gl.convert_layout(pt.to(dtype), a_layout)
            dv_tok = warpgroup_mma(p16, dos, dv, is_async=True)
            dpt = warpgroup_mma_wait(1, deps=(dp_tok,))
            ds16 = gl.convert_layout((pt * (dpt - delta[None, :])).to(dtype), a_layout)
            dk_tok = warpgroup_mma(ds16, qs, dk, is_async=True)
            dv, dk, p16, ds16 = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, p16, ds16))
            mbarrier.arrive(empty.index(slot), count=1)
            t += 1
    k.store((dk * sm_scale).to(dtype))  # K and V halves are free: their last wgmmas have completed
    v.store(dv.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(desc_dk, [b, hk, kb * 2 * R + HALF * R, 0], k_smem.index(HALF))
    tma.async_copy_shared_to_global(desc_dv, [b, hk, kb * 2 * R + HALF * R, 0], v_smem.index(HALF))
    tma.store_wait(pendings=0)


@gluon.jit
def _bwd_dkdv_ws_kernel(desc_q, desc_do, desc_k, desc_v, desc_dk, desc_dv, LSE, DELTA, s_lb, s_lh,
                        IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch,
                        qk_scale, sm_scale, HKV, GROUP, SEQ_Q, NS: gl.constexpr):
    """Shared memory and barriers of one (kv block, batch x kv head), then the producer and the two consumers."""
    dtype: gl.constexpr = desc_q.dtype
    kb = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    q_smem = gl.allocate_shared_memory(dtype, [NS] + desc_q.block_type.shape, desc_q.layout)
    do_smem = gl.allocate_shared_memory(dtype, [NS] + desc_do.block_type.shape, desc_do.layout)
    k_smem = gl.allocate_shared_memory(dtype, [2] + desc_k.block_type.shape, desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2] + desc_v.block_type.shape, desc_v.layout)
    kv_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(kv_bars.index(i), count=1)
    for i in gl.static_range(NS):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    fence_async_shared()
    args = (desc_q, desc_do, desc_k, desc_v, desc_dk, desc_dv, q_smem, do_smem, k_smem, v_smem, kv_bars, ready,
            empty, LSE, DELTA, s_lb, s_lh, IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch, b, hk, kb,
            GROUP, qk_scale, sm_scale, SEQ_Q)
    # The producer is the default partition (it then keeps 24 registers), so each consumer gets 240: with the
    # consumers' own 232 beside a default-partition consumer's 256, d = 128 spilled.
    gl.warp_specialize([(_dkdv_producer, args), (_dkdv_consumer_lo, args), (_dkdv_consumer_hi, args)], [4, 4],
                       [240, 240])


def gluon_dkdv(q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, dk: Tensor, dv: Tensor,
               bs: BlockSparse, scale: float, lists: tuple, tiles: Tensor) -> None:
    """Launch into ``dk`` / ``dv``. ``lse`` and ``delta`` are [B, H, S] float32 contiguous (natural-log LSE);
    ``lists`` are the per-kv-block lists (block_sparse._kv_lists), ``tiles`` block_sparse._tiles."""
    B, H, Sq, D = q.shape
    Hkv = k.shape[1]
    _bwd_dkdv_ws_kernel[(len(bs.kv_blocks), B * Hkv)](
        descriptor(q, Q_ROWS[D]), descriptor(do, Q_ROWS[D]), descriptor(k, KV_ROWS), descriptor(v, KV_ROWS),
        descriptor(dk, KV_ROWS), descriptor(dv, KV_ROWS), lse, delta, lse.stride(0), lse.stride(1), *lists[:4],
        tiles, *lists[4:], scale * LOG2E, scale, Hkv, H // Hkv, Sq, NS=SLOTS, num_warps=4)



@gluon.jit
def _dq_producer(desc_q, desc_do, desc_k, desc_v, desc_dq, q_smem, do_smem, k_smem, v_smem, q_bars, k_ready,
                 v_ready, empty, LSE, DELTA, s_lb, s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0,
                 qk_scale, sm_scale, SEQ_Q):
    """Both 64-row halves of Q and dO, then every listed K/V block into the ring once both consumers released
    its slot."""
    ROWS: gl.constexpr = desc_q.block_type.shape[2]
    for c in gl.static_range(2):
        mbarrier.expect(q_bars.index(c), 2 * desc_q.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_q, [b, h, q0 + c * ROWS, 0], q_bars.index(c), q_smem.index(c))
        tma.async_copy_global_to_shared(desc_do, [b, h, q0 + c * ROWS, 0], q_bars.index(c), do_smem.index(c))
    stream_kv_blocks(desc_k, desc_v, k_smem, v_smem, k_ready, v_ready, empty, IDX, row, n_all, b, hk)


@gluon.jit
def _dq_consumer_lo(desc_q, desc_do, desc_k, desc_v, desc_dq, q_smem, do_smem, k_smem, v_smem, q_bars, k_ready,
                    v_ready, empty, LSE, DELTA, s_lb, s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0,
                    qk_scale, sm_scale, SEQ_Q):
    _dq_consume(desc_q, desc_do, desc_k, desc_v, desc_dq, q_smem, do_smem, k_smem, v_smem, q_bars, k_ready, v_ready,
                empty, LSE, DELTA, s_lb, s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, sm_scale,
                SEQ_Q, 0)


@gluon.jit
def _dq_consumer_hi(desc_q, desc_do, desc_k, desc_v, desc_dq, q_smem, do_smem, k_smem, v_smem, q_bars, k_ready,
                    v_ready, empty, LSE, DELTA, s_lb, s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0,
                    qk_scale, sm_scale, SEQ_Q):
    _dq_consume(desc_q, desc_do, desc_k, desc_v, desc_dq, q_smem, do_smem, k_smem, v_smem, q_bars, k_ready, v_ready,
                empty, LSE, DELTA, s_lb, s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, sm_scale,
                SEQ_Q, 1)


@gluon.jit
def _dq_consume(desc_q, desc_do, desc_k, desc_v, desc_dq, q_smem, do_smem, k_smem, v_smem, q_bars, k_ready, v_ready,
                empty, LSE, DELTA, s_lb, s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, sm_scale,
                SEQ_Q, HALF: gl.constexpr):
    """Query rows HALF * 64 .. + 64: per listed block, S = Q·Kᵀ and dP = dO·Vᵀ go to the tensor cores together,
    P is formed while dP runs, then dQ += dS·K; dQ · scale goes out through Q's buffer."""
    ROWS: gl.constexpr = desc_q.block_type.shape[2]
    D: gl.constexpr = desc_q.block_type.shape[3]
    BLOCK_KV: gl.constexpr = desc_k.block_type.shape[2]
    NSLOT: gl.constexpr = k_smem.type.shape[0]
    dtype: gl.constexpr = desc_q.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_KV, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, D, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    r0 = HALF * ROWS
    q_buf = q_smem.index(HALF)
    q = q_buf.reshape([ROWS, D])
    do = do_smem.index(HALF).reshape([ROWS, D])
    offs = q0 + r0 + gl.arange(0, ROWS, layout=row_s)
    valid = offs < SEQ_Q
    lrow = b.to(gl.int64) * s_lb + h * s_lh
    lse = gl.load(LSE + lrow + offs, mask=valid, other=float("inf"))
    lse = gl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # empty rows: p = 0
    delta = gl.load(DELTA + lrow + offs, mask=valid, other=0.0)
    dq = gl.zeros([ROWS, D], gl.float32, layout=acc_layout)
    mbarrier.wait(q_bars.index(HALF), 0)
    for j in range(0, n_all):
        slot = j % NSLOT
        phase = (j // NSLOT) & 1
        s_zero = gl.zeros([ROWS, BLOCK_KV], gl.float32, layout=s_layout)  # made here, not held across the loop
        mbarrier.wait(k_ready.index(slot), phase)
        s_tok = warpgroup_mma(q, transposed_tile(k_smem, slot, BLOCK_KV, D), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(slot), phase)
        dp_tok = warpgroup_mma(do, transposed_tile(v_smem, slot, BLOCK_KV, D), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s_tok,))
        s = masked_rows(s, TILES, TID, row, j, n_full, r0, ROWS, 2 * ROWS, BLOCK_KV, s_layout)
        p = gl.exp2(s * qk_scale - lse[:, None])
        dp = warpgroup_mma_wait(0, deps=(dp_tok,))
        ds16 = gl.convert_layout((p * (dp - delta[:, None])).to(dtype), a_layout)
        dq_tok = warpgroup_mma(ds16, k_smem.index(slot).reshape([BLOCK_KV, D]), dq, is_async=True)
        dq, ds16 = warpgroup_mma_wait(0, deps=(dq_tok, ds16))
        mbarrier.arrive(empty.index(slot), count=1)
    q.store((dq * sm_scale).to(dtype))  # Q's buffer is free: this warpgroup's last Q·Kᵀ has completed
    fence_async_shared()
    tma.async_copy_shared_to_global(desc_dq, [b, h, q0 + r0, 0], q_buf)  # rows past the sequence are clipped
    tma.store_wait(pendings=0)


@gluon.jit
def _bwd_dq_ws_kernel(desc_q, desc_do, desc_k, desc_v, desc_dq, LSE, DELTA, s_lb, s_lh,
                      IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch,
                      qk_scale, sm_scale, H, GROUP, N_QB, SEQ_Q, NSLOT: gl.constexpr):
    """Shared memory and barriers of one (query block, batch x head), last query blocks first, then the producer
    and the two consumers."""
    dtype: gl.constexpr = desc_q.dtype
    pid_m = N_QB - 1 - gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q0 = pid_m * 2 * desc_q.block_type.shape[2]
    row = b.to(gl.int64) * s_ib + h * s_ih + pid_m * s_im
    crow = b.to(gl.int64) * s_cb + h * s_ch + pid_m
    n_full = gl.load(FULL + crow)
    n_all = gl.load(CNT + crow)
    q_smem = gl.allocate_shared_memory(dtype, [2] + desc_q.block_type.shape, desc_q.layout)
    do_smem = gl.allocate_shared_memory(dtype, [2] + desc_do.block_type.shape, desc_do.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NSLOT] + desc_k.block_type.shape, desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NSLOT] + desc_v.block_type.shape, desc_v.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NSLOT, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NSLOT, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NSLOT, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
    for i in gl.static_range(NSLOT):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    fence_async_shared()
    args = (desc_q, desc_do, desc_k, desc_v, desc_dq, q_smem, do_smem, k_smem, v_smem, q_bars, k_ready, v_ready,
            empty, LSE, DELTA, s_lb, s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, sm_scale,
            SEQ_Q)
    gl.warp_specialize([(_dq_producer, args), (_dq_consumer_lo, args), (_dq_consumer_hi, args)], [4, 4],
                       [240, 240])


def gluon_dq(q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, dq: Tensor, bs: BlockSparse,
             scale: float, lists: tuple, tiles: Tensor) -> None:
    """Launch into ``dq``; ``lists`` are the per-query-block lists (block_sparse._q_lists), the rest as in
    gluon_dkdv."""
    B, H, Sq, D = q.shape
    nqb = len(bs.q_blocks)
    rows = BLOCK // 2
    _bwd_dq_ws_kernel[(nqb, B * H)](
        descriptor(q, rows), descriptor(do, rows), descriptor(k, BLOCK), descriptor(v, BLOCK), descriptor(dq, rows),
        lse, delta, lse.stride(0), lse.stride(1), *lists[:4], tiles, *lists[4:], scale * LOG2E, scale, H,
        H // k.shape[1], nqb, Sq, NSLOT=DQ_SLOTS, num_warps=4)
