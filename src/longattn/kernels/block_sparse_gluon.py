"""Hopper (sm90) block-sparse forward in Gluon: explicit asynchronous wgmma, so each step's softmax runs while the
tensor cores multiply the previous step's P by V (FlashAttention-3's intra-warpgroup overlap, which Triton's
own pipeliner does not produce: it waits on the QK wgmma right after issuing it; benchmarks/NOTES-kernels.md).

One program per (query block, batch x head), 8 warps (two warpgroups of 64 rows), query blocks last-first.
K/V tiles arrive by TMA into a ring of STAGES shared-memory slots, each with its own mbarrier per operand; a slot
is refilled once both warpgroups have finished the wgmma that read it. Block lists, full/partial split and bit
tiles are the BlockSparse's, exactly as in block_sparse._fwd_tma_kernel; results match it to rounding.
"""

from __future__ import annotations

import torch
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
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from longattn.masks.block_sparse import BlockSparse

LOG2E = 1.4426950408889634
NUM_WARPS = 8


@gluon.jit
def _issue_kv(desc_k, desc_v, k_smem, v_smem, k_bars, v_bars, IDX, row, j, b, hk,
              BLOCK_KV: gl.constexpr, STAGES: gl.constexpr):
    """Start the TMA loads of the j-th listed kv block into ring slot j % STAGES."""
    slot = j % STAGES
    k0 = gl.load(IDX + row + j) * BLOCK_KV
    mbarrier.expect(k_bars.index(slot), desc_k.block_type.nbytes)
    tma.async_copy_global_to_shared(desc_k, [b, hk, k0, 0], k_bars.index(slot), k_smem.index(slot))
    mbarrier.expect(v_bars.index(slot), desc_v.block_type.nbytes)
    tma.async_copy_global_to_shared(desc_v, [b, hk, k0, 0], v_bars.index(slot), v_smem.index(slot))


@gluon.jit
def _masked(s, TILES, TID, row, j, n_full, BLOCK_Q: gl.constexpr, BLOCK_KV: gl.constexpr, layout: gl.constexpr):
    """Scores of the j-th listed block with the bit tile applied when the block is partial (j >= n_full)."""
    if j >= n_full:
        WORDS: gl.constexpr = BLOCK_KV // 32
        tile = gl.load(TID + row + j).to(gl.int64)
        rows = gl.arange(0, BLOCK_Q, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, BLOCK_KV, layout=gl.SliceLayout(0, layout))
        words = gl.load(TILES + tile * (BLOCK_Q * WORDS) + rows[:, None] * WORDS + (cols // 32)[None, :])
        keep = ((words >> (cols % 32)[None, :]) & 1) != 0
        s = gl.where(keep, s, float("-inf"))
    return s


@gluon.jit
def _masked_rows(s, TILES, TID, row, j, n_full, r0, ROWS: gl.constexpr, BLOCK_KV: gl.constexpr,
                 layout: gl.constexpr):
    """Scores of rows r0 .. r0 + ROWS of the j-th listed block, bit tile applied when the block is partial."""
    if j >= n_full:
        WORDS: gl.constexpr = BLOCK_KV // 32
        tile = gl.load(TID + row + j).to(gl.int64)
        rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, BLOCK_KV, layout=gl.SliceLayout(0, layout))
        words = gl.load(TILES + tile * (128 * WORDS) + rows[:, None] * WORDS + (cols // 32)[None, :])
        keep = ((words >> (cols % 32)[None, :]) & 1) != 0
        s = gl.where(keep, s, float("-inf"))
    return s


@gluon.jit
def _k_t(k_smem, slot, BLOCK_KV: gl.constexpr, HEAD_DIM: gl.constexpr):
    """K tile of ring slot ``slot`` as the [HEAD_DIM, BLOCK_KV] operand of Q @ K^T (a transposed view)."""
    return k_smem.index(slot).reshape([BLOCK_KV, HEAD_DIM]).permute((1, 0))


@gluon.jit
def _online_softmax(s, m_i, l_i, qk_scale):
    """One online-softmax step on raw scores s (masked entries -inf): unnormalised probabilities, the factor
    that rescales the running sums, and the new running max and sum. Rows with nothing visible stay at -inf."""
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - m_safe[:, None])
    alpha = gl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _fwd_gluon_kernel(
    desc_q, desc_k, desc_v, desc_o, LSE, s_lb, s_lh,
    IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch,
    qk_scale, H, GROUP, SEQ_Q, N_QB,
    BLOCK_Q: gl.constexpr, BLOCK_KV: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
):
    dtype: gl.constexpr = desc_q.dtype
    pid_m = N_QB - 1 - gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q0 = pid_m * BLOCK_Q
    row = b.to(gl.int64) * s_ib + h * s_ih + pid_m * s_im
    crow = b.to(gl.int64) * s_cb + h * s_ch + pid_m
    n_full = gl.load(FULL + crow)
    n_all = gl.load(CNT + crow)

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                        instr_shape=[16, BLOCK_KV, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = gl.allocate_shared_memory(dtype, desc_q.block_type.shape, desc_q.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_k.block_type.shape, desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_v.block_type.shape, desc_v.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    mbarrier.expect(q_bar, desc_q.block_type.nbytes)
    tma.async_copy_global_to_shared(desc_q, [b, h, q0, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        if i < n_all:
            _issue_kv(desc_k, desc_v, k_smem, v_smem, k_bars, v_bars, IDX, row, i, b, hk, BLOCK_KV, STAGES)

    q = q_smem.reshape([BLOCK_Q, HEAD_DIM])
    m_i = gl.full([BLOCK_Q], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_Q], gl.float32, layout=row_s)
    acc = gl.zeros([BLOCK_Q, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_Q, BLOCK_KV], gl.float32, layout=s_layout)
    mbarrier.wait(q_bar, 0)
    if n_all > 0:
        mbarrier.wait(k_bars.index(0), 0)
        s_tok = warpgroup_mma(q, _k_t(k_smem, 0, BLOCK_KV, HEAD_DIM), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        s = _masked(s, TILES, TID, row, 0, n_full, BLOCK_Q, BLOCK_KV, s_layout)
        p32, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
        p = gl.convert_layout(p32.to(dtype), p_layout)
        for j in range(1, n_all):
            slot = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(k_bars.index(slot), (j // STAGES) & 1)
            s_tok = warpgroup_mma(q, _k_t(k_smem, slot, BLOCK_KV, HEAD_DIM), s_zero, use_acc=False, is_async=True)
            # P @ V of the previous block runs on the tensor cores during this block's softmax
            mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
            acc_tok = warpgroup_mma(p, v_smem.index(prev).reshape([BLOCK_KV, HEAD_DIM]), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_tok,))
            s = _masked(s, TILES, TID, row, j, n_full, BLOCK_Q, BLOCK_KV, s_layout)
            p32, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
            acc, p = warpgroup_mma_wait(0, deps=(acc_tok, p))
            # the previous block's slot is free: refill it (the compiler puts a CTA barrier before the TMA issue,
            # so the other warpgroup is past its own wait too)
            if j - 1 + STAGES < n_all:
                _issue_kv(desc_k, desc_v, k_smem, v_smem, k_bars, v_bars, IDX, row, j - 1 + STAGES, b, hk,
                          BLOCK_KV, STAGES)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p = gl.convert_layout(p32.to(dtype), p_layout)
        last = (n_all - 1) % STAGES
        mbarrier.wait(v_bars.index(last), ((n_all - 1) // STAGES) & 1)
        acc_tok = warpgroup_mma(p, v_smem.index(last).reshape([BLOCK_KV, HEAD_DIM]), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc_tok,))

    empty = l_i == 0.0
    l_o = gl.convert_layout(gl.where(empty, 1.0, l_i), row_o)
    out = acc / l_o[:, None]
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(gl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    q_smem.reshape([BLOCK_Q, HEAD_DIM]).store(out.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(desc_o, [b, h, q0, 0], q_smem)
    offs = gl.arange(0, BLOCK_Q, layout=row_s)
    gl.store(LSE + b.to(gl.int64) * s_lb + h * s_lh + q0 + offs, lse, mask=offs < SEQ_Q - q0)
    tma.store_wait(pendings=0)
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))


@gluon.jit
def _take_turn(turn, g, HALF: gl.constexpr):
    """Ping-pong (when ``turn`` holds two barriers): wait until the other warpgroup has issued its wgmmas of GEMM
    phase g (warpgroup 0 goes first), so one warpgroup's softmax runs under the other's matrix products."""
    if turn.type.shape[0] == 2:
        mbarrier.wait(turn.index(HALF), (g & 1) ^ (1 - HALF))


@gluon.jit
def _pass_turn(turn, HALF: gl.constexpr):
    """Ping-pong: this warpgroup's wgmmas of the phase are issued; the other warpgroup may issue its own."""
    if turn.type.shape[0] == 2:
        mbarrier.arrive(turn.index(1 - HALF), count=1)


@gluon.jit
def _ws_producer(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, empty, turn,
                 LSE, s_lb, s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, SEQ_Q):
    """One warp: the two 64-row halves of Q, then every listed K/V block into the ring as soon as both consumers
    have released its slot (mbarriers start with phase 1 complete, so the first STAGES waits pass at once)."""
    ROWS: gl.constexpr = desc_q.block_type.shape[2]
    BLOCK_KV: gl.constexpr = desc_k.block_type.shape[2]
    STAGES: gl.constexpr = k_smem.type.shape[0]
    for c in gl.static_range(2):
        mbarrier.expect(q_bars.index(c), desc_q.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_q, [b, h, q0 + c * ROWS, 0], q_bars.index(c), q_smem.index(c))
    for j in range(0, n_all):
        slot = j % STAGES
        mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)
        k0 = gl.load(IDX + row + j) * BLOCK_KV
        mbarrier.expect(k_ready.index(slot), desc_k.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_k, [b, hk, k0, 0], k_ready.index(slot), k_smem.index(slot))
        mbarrier.expect(v_ready.index(slot), desc_v.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_v, [b, hk, k0, 0], v_ready.index(slot), v_smem.index(slot))


@gluon.jit
def _ws_consumer_lo(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, empty, turn,
                    LSE, s_lb, s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, SEQ_Q):
    _ws_consume(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, empty, turn,
                LSE, s_lb, s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, SEQ_Q, 0)


@gluon.jit
def _ws_consumer_hi(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, empty, turn,
                    LSE, s_lb, s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, SEQ_Q):
    _ws_consume(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, empty, turn,
                LSE, s_lb, s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, SEQ_Q, 1)


@gluon.jit
def _ws_consume(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, empty, turn,
                LSE, s_lb, s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, SEQ_Q,
                HALF: gl.constexpr):
    """One warpgroup: query rows HALF * 64 .. + 64 of the block, the same overlapped loop as _fwd_gluon_kernel;
    a slot is released (one arrive of the two its barrier waits for) once this warpgroup's P @ V on it is done."""
    ROWS: gl.constexpr = desc_q.block_type.shape[2]
    HEAD_DIM: gl.constexpr = desc_q.block_type.shape[3]
    BLOCK_KV: gl.constexpr = desc_k.block_type.shape[2]
    STAGES: gl.constexpr = k_smem.type.shape[0]
    dtype: gl.constexpr = desc_q.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_KV, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    r0 = HALF * ROWS
    q_buf = q_smem.index(HALF)
    q = q_buf.reshape([ROWS, HEAD_DIM])
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([ROWS], gl.float32, layout=row_s)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([ROWS, BLOCK_KV], gl.float32, layout=s_layout)
    mbarrier.wait(q_bars.index(HALF), 0)
    if n_all > 0:
        mbarrier.wait(k_ready.index(0), 0)
        _take_turn(turn, 0, HALF)
        s_tok = warpgroup_mma(q, _k_t(k_smem, 0, BLOCK_KV, HEAD_DIM), s_zero, use_acc=False, is_async=True)
        _pass_turn(turn, HALF)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        s = _masked_rows(s, TILES, TID, row, 0, n_full, r0, ROWS, BLOCK_KV, s_layout)
        p32, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
        p = gl.convert_layout(p32.to(dtype), p_layout)
        for j in range(1, n_all):
            slot = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
            _take_turn(turn, j, HALF)
            s_tok = warpgroup_mma(q, _k_t(k_smem, slot, BLOCK_KV, HEAD_DIM), s_zero, use_acc=False, is_async=True)
            acc_tok = warpgroup_mma(p, v_smem.index(prev).reshape([BLOCK_KV, HEAD_DIM]), acc, is_async=True)
            _pass_turn(turn, HALF)
            s = warpgroup_mma_wait(1, deps=(s_tok,))
            s = _masked_rows(s, TILES, TID, row, j, n_full, r0, ROWS, BLOCK_KV, s_layout)
            p32, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
            acc, p = warpgroup_mma_wait(0, deps=(acc_tok, p))
            mbarrier.arrive(empty.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p = gl.convert_layout(p32.to(dtype), p_layout)
        last = (n_all - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((n_all - 1) // STAGES) & 1)
        _take_turn(turn, n_all, HALF)
        acc_tok = warpgroup_mma(p, v_smem.index(last).reshape([BLOCK_KV, HEAD_DIM]), acc, is_async=True)
        _pass_turn(turn, HALF)
        acc = warpgroup_mma_wait(0, deps=(acc_tok,))
        mbarrier.arrive(empty.index(last), count=1)
    empty_rows = l_i == 0.0
    l_o = gl.convert_layout(gl.where(empty_rows, 1.0, l_i), row_o)
    out = acc / l_o[:, None]
    lse = gl.where(empty_rows, float("-inf"), (m_i + gl.log2(gl.where(empty_rows, 1.0, l_i))) * 0.6931471805599453)
    q.store(out.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(desc_o, [b, h, q0 + r0, 0], q_buf)
    offs = gl.arange(0, ROWS, layout=row_s)
    gl.store(LSE + b.to(gl.int64) * s_lb + h * s_lh + q0 + r0 + offs, lse, mask=offs < SEQ_Q - q0 - r0)
    tma.store_wait(pendings=0)


@gluon.jit
def _fwd_ws_kernel(
    desc_q, desc_k, desc_v, desc_o, LSE, s_lb, s_lh,
    IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch,
    qk_scale, H, GROUP, SEQ_Q, N_QB,
    BLOCK_Q: gl.constexpr, BLOCK_KV: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
    PINGPONG: gl.constexpr,
):
    """Warp-specialised form (FlashAttention-3's layout of work): one producer warp issues every TMA load, two
    4-warp consumers each own 64 query rows of the 128-row block and share the K/V ring."""
    dtype: gl.constexpr = desc_q.dtype
    pid_m = N_QB - 1 - gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q0 = pid_m * BLOCK_Q
    row = b.to(gl.int64) * s_ib + h * s_ih + pid_m * s_im
    crow = b.to(gl.int64) * s_cb + h * s_ch + pid_m
    n_full = gl.load(FULL + crow)
    n_all = gl.load(CNT + crow)
    q_smem = gl.allocate_shared_memory(dtype, [2] + desc_q.block_type.shape, desc_q.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_k.block_type.shape, desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_v.block_type.shape, desc_v.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    TURNS: gl.constexpr = 2 if PINGPONG else 1
    turn = gl.allocate_shared_memory(gl.int64, [TURNS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
    for i in gl.static_range(TURNS):
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    fence_async_shared()
    args = (desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, empty, turn,
            LSE, s_lb, s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, SEQ_Q)
    gl.warp_specialize([(_ws_consumer_lo, args), (_ws_consumer_hi, args), (_ws_producer, args)], [4, 1], [232, 24])


def gluon_applies(q: Tensor, bs: BlockSparse) -> bool:
    """Shapes this kernel takes (beyond the TMA path's conditions): 128x128 blocks, head_dim 64 or 128."""
    return tuple(bs.block_size) == (128, 128) and q.shape[-1] in (64, 128)


VARIANTS = ("overlap", "ws", "pingpong")


def gluon_forward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bs: BlockSparse, scale: float,
                  lists: tuple, tiles: Tensor, stages: int = 2, variant: str = "overlap") -> None:
    """Launch a Gluon forward into ``out`` / ``lse``; ``lists`` and ``tiles`` as block_sparse._list_args /
    _tiles give them. ``variant``: "overlap" (one 8-warp program issuing its own loads), "ws" (producer warp + two
    consumer warpgroups), "pingpong" (ws with the consumers' matrix products taking turns)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    B, H, Sq, D = q.shape
    bq, bkv = bs.block_size
    gdtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    rows = bq if variant == "overlap" else bq // 2

    def desc(t: Tensor, n: int) -> TensorDescriptor:
        block = [1, 1, n, D]
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block,
                                gl.NVMMASharedLayout.get_default_for(block, gdtype))

    nqb = len(bs.q_blocks)
    args = (desc(q, rows), desc(k, bkv), desc(v, bkv), desc(out, rows), lse, lse.stride(0), lse.stride(1),
            *lists[:4], tiles, *lists[4:], scale * LOG2E, H, H // k.shape[1], Sq, nqb)
    consts = dict(BLOCK_Q=bq, BLOCK_KV=bkv, HEAD_DIM=D, STAGES=stages)
    if variant == "overlap":
        _fwd_gluon_kernel[(nqb, B * H)](*args, **consts, num_warps=NUM_WARPS)
    else:
        _fwd_ws_kernel[(nqb, B * H)](*args, **consts, PINGPONG=variant == "pingpong", num_warps=4)
