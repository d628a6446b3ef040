"""Hopper (sm90) block-sparse forward written in Gluon, laid out as FlashAttention-3 lays out its work.

Per program (one 128-row query block of one batch x head, last blocks first): a producer warp issues every TMA load
(both 64-row halves of Q, then each listed K/V block into a ring of STAGES shared-memory slots), and two 4-warp
consumer warpgroups each own 64 query rows. A consumer issues Q @ K_j^T and P_{j-1} @ V_{j-1} as asynchronous
wgmmas and runs block j's softmax while the second product is on the tensor cores — the overlap Triton's own
pipeliner does not produce (it waits on each wgmma right after issuing it; benchmarks/NOTES-kernels.md). A slot is
handed back to the producer once both consumers' P @ V on it has completed (an mbarrier with two arrivals).

Block lists, the full/partial split and bit tiles are the BlockSparse's, as in block_sparse._fwd_tma_kernel;
results match that kernel to rounding (tests/gpu). Variants measured on the way (one 8-warp program issuing its
own loads; the two consumers' products taking turns, "ping-pong") were slower or no faster: NOTES-kernels.md.
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
BLOCK = 128  # query and kv block size this kernel takes
STAGES = 3  # K/V ring slots: 224 KB of shared memory with Q at head_dim 128 (faster than 2 on the H200)
# Registers per thread, by warpgroup: the first consumer (default partition) gets 256, so 256 + 232 + 24 = 512 and
# the three warpgroups hold the SM's 64K registers; more for the second consumer would leave its allocation waiting.
CONSUMER_REGS = gl.constexpr(232)
PRODUCER_REGS = gl.constexpr(24)


@gluon.jit
def masked_rows(s, TILES, TID, row, j, n_full, r0, ROWS: gl.constexpr, BLOCK_Q: gl.constexpr,
                 BLOCK_KV: gl.constexpr, layout: gl.constexpr):
    """Scores of query rows r0 .. r0 + ROWS of the j-th listed block, its bit tile applied when the block is
    partial (j >= n_full). Each thread reads the words of its own elements (from L1 after the first)."""
    if j >= n_full:
        WORDS: gl.constexpr = BLOCK_KV // 32
        tile = gl.load(TID + row + j).to(gl.int64)
        rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, BLOCK_KV, layout=gl.SliceLayout(0, layout))
        words = gl.load(TILES + tile * (BLOCK_Q * WORDS) + rows[:, None] * WORDS + (cols // 32)[None, :])
        keep = ((words >> (cols % 32)[None, :]) & 1) != 0
        s = gl.where(keep, s, float("-inf"))
    return s


@gluon.jit
def transposed_tile(k_smem, slot, BLOCK_KV: gl.constexpr, HEAD_DIM: gl.constexpr):
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
def _producer(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, empty, LSE, s_lb,
              s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, SEQ_Q):
    """One warp: the two 64-row halves of Q, then every listed K/V block into the ring as soon as both consumers
    have released its slot (mbarriers start with phase 1 complete, so the first STAGES waits pass at once)."""
    ROWS: gl.constexpr = desc_q.block_type.shape[2]
    for c in gl.static_range(2):
        mbarrier.expect(q_bars.index(c), desc_q.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_q, [b, h, q0 + c * ROWS, 0], q_bars.index(c), q_smem.index(c))
    stream_kv_blocks(desc_k, desc_v, k_smem, v_smem, k_ready, v_ready, empty, IDX, row, n_all, b, hk)


@gluon.jit
def stream_kv_blocks(desc_k, desc_v, k_smem, v_smem, k_ready, v_ready, empty, IDX, row, n_all, b, hk):
    """Producer loop: each listed K/V block (list row ``row`` of IDX) into the ring as soon as both consumers have
    released its slot; K and V complete separate barriers, so Q @ K^T can start before V has landed."""
    BLOCK_KV: gl.constexpr = desc_k.block_type.shape[2]
    NSLOT: gl.constexpr = k_smem.type.shape[0]
    for j in range(0, n_all):
        slot = j % NSLOT
        mbarrier.wait(empty.index(slot), ((j // NSLOT) & 1) ^ 1)
        k0 = gl.load(IDX + row + j) * BLOCK_KV
        mbarrier.expect(k_ready.index(slot), desc_k.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_k, [b, hk, k0, 0], k_ready.index(slot), k_smem.index(slot))
        mbarrier.expect(v_ready.index(slot), desc_v.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_v, [b, hk, k0, 0], v_ready.index(slot), v_smem.index(slot))


@gluon.jit
def _consumer_lo(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, empty, LSE,
                 s_lb, s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, SEQ_Q):
    """Rows 0..63 (partition entry points share one signature, so the half is fixed here, not passed)."""
    _consume(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, empty, LSE, s_lb,
             s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, SEQ_Q, 0)


@gluon.jit
def _consumer_hi(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, empty, LSE,
                 s_lb, s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, SEQ_Q):
    """Rows 64..127."""
    _consume(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, empty, LSE, s_lb,
             s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, SEQ_Q, 1)


@gluon.jit
def _consume(desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, empty, LSE, s_lb,
             s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, SEQ_Q, HALF: gl.constexpr):
    """One warpgroup, query rows HALF * 64 .. + 64: step j issues Q @ K_j^T and P_{j-1} @ V_{j-1}, waits for the
    first only, runs block j's softmax, then waits for the second, releases slot j - 1 and rescales."""
    ROWS: gl.constexpr = desc_q.block_type.shape[2]
    HEAD_DIM: gl.constexpr = desc_q.block_type.shape[3]
    BLOCK_KV: gl.constexpr = desc_k.block_type.shape[2]
    NSLOT: gl.constexpr = k_smem.type.shape[0]
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
        s_tok = warpgroup_mma(q, transposed_tile(k_smem, 0, BLOCK_KV, HEAD_DIM), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        s = masked_rows(s, TILES, TID, row, 0, n_full, r0, ROWS, 2 * ROWS, BLOCK_KV, s_layout)
        p32, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
        p = gl.convert_layout(p32.to(dtype), p_layout)
        for j in range(1, n_all):
            slot = j % NSLOT
            prev = (j - 1) % NSLOT
            mbarrier.wait(k_ready.index(slot), (j // NSLOT) & 1)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // NSLOT) & 1)
            k_t = transposed_tile(k_smem, slot, BLOCK_KV, HEAD_DIM)
            s_tok = warpgroup_mma(q, k_t, s_zero, use_acc=False, is_async=True)
            acc_tok = warpgroup_mma(p, v_smem.index(prev).reshape([BLOCK_KV, HEAD_DIM]), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_tok,))
            s = masked_rows(s, TILES, TID, row, j, n_full, r0, ROWS, 2 * ROWS, BLOCK_KV, s_layout)
            p32, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
            acc, p = warpgroup_mma_wait(0, deps=(acc_tok, p))
            mbarrier.arrive(empty.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p = gl.convert_layout(p32.to(dtype), p_layout)
        last = (n_all - 1) % NSLOT
        mbarrier.wait(v_ready.index(last), ((n_all - 1) // NSLOT) & 1)
        acc_tok = warpgroup_mma(p, v_smem.index(last).reshape([BLOCK_KV, HEAD_DIM]), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc_tok,))
        mbarrier.arrive(empty.index(last), count=1)
    empty_rows = l_i == 0.0
    l_o = gl.convert_layout(gl.where(empty_rows, 1.0, l_i), row_o)
    out = acc / l_o[:, None]
    lse = gl.where(empty_rows, float("-inf"), (m_i + gl.log2(gl.where(empty_rows, 1.0, l_i))) * 0.6931471805599453)
    q.store(out.to(dtype))  # Q's buffer is free: this warpgroup's last Q @ K^T has completed
    fence_async_shared()
    tma.async_copy_shared_to_global(desc_o, [b, h, q0 + r0, 0], q_buf)  # rows past the sequence are clipped
    offs = gl.arange(0, ROWS, layout=row_s)
    gl.store(LSE + b.to(gl.int64) * s_lb + h * s_lh + q0 + r0 + offs, lse, mask=offs < SEQ_Q - q0 - r0)
    tma.store_wait(pendings=0)


@gluon.jit
def _fwd_ws_kernel(
    desc_q, desc_k, desc_v, desc_o, LSE, s_lb, s_lh,
    IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch,
    qk_scale, H, GROUP, N_QB, SEQ_Q,
    BLOCK_Q: gl.constexpr, NSLOT: gl.constexpr,
):
    """Shared memory, barriers and the block list of one (query block, batch x head), then the three partitions."""
    dtype: gl.constexpr = desc_q.dtype
    pid_m = N_QB - 1 - gl.program_id(0)  # last query blocks first: under causal-like masks the longest rows
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
        mbarrier.init(empty.index(i), count=2)  # one arrival per consumer
    fence_async_shared()
    args = (desc_q, desc_k, desc_v, desc_o, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready, empty, LSE, s_lb,
            s_lh, IDX, TID, TILES, row, n_full, n_all, b, h, hk, q0, qk_scale, SEQ_Q)
    gl.warp_specialize([(_consumer_lo, args), (_consumer_hi, args), (_producer, args)], [4, 1],
                       [CONSUMER_REGS, PRODUCER_REGS])


def gluon_applies(q: Tensor, bs: BlockSparse) -> bool:
    """Whether this kernel takes inputs the TMA path already takes (see block_sparse._tma_applies): a Hopper GPU
    (wgmma is sm90-only), 128 x 128 blocks, head_dim 64 or 128."""
    return (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9
            and tuple(bs.block_size) == (BLOCK, BLOCK) and q.shape[-1] in (64, 128))


def descriptor(t: Tensor, rows: int) -> TensorDescriptor:
    """TMA descriptor over a (batch, heads, seq, head_dim) fp16/bf16 tensor moving ``rows`` rows of one head at a
    time (the launch's, and the sm_90 compile test's, one way of building them)."""
    block = [1, 1, rows, t.shape[-1]]
    gdtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block,
                            gl.NVMMASharedLayout.get_default_for(block, gdtype))


def gluon_forward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bs: BlockSparse, qk_scale: float,
                  lists: tuple, tiles: Tensor) -> None:
    """Launch into ``out`` / ``lse``. ``qk_scale`` is softmax scale x log2(e); ``lists`` and ``tiles`` as
    block_sparse._q_lists / _tiles give them."""
    B, H, Sq, D = q.shape
    nqb = len(bs.q_blocks)
    _fwd_ws_kernel[(nqb, B * H)](
        descriptor(q, BLOCK // 2), descriptor(k, BLOCK), descriptor(v, BLOCK), descriptor(out, BLOCK // 2), lse,
        lse.stride(0),
        lse.stride(1), *lists[:4], tiles, *lists[4:], qk_scale, H, H // k.shape[1], nqb, Sq,
        BLOCK_Q=BLOCK, NSLOT=STAGES, num_warps=4,
    )
