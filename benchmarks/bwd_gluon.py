"""Experiment (compiled for sm_90 with Triton 3.6 and 3.7, no spills; not yet run on a GPU): the dK/dV backward in
Gluon with the forward's layout of work (kernels/block_sparse_gluon.py) — a producer partition loads Q / dO slices
(32 rows at d = 128, 64 at d = 64) of every listed query block into a ring; two consumer warpgroups own 64 kv rows
each and compute Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ as async wgmmas, Pᵀ while dPᵀ
runs, dV += Pᵀ·dO while dSᵀ is formed, dK += dSᵀ·Q, then hand the slot back. GQA heads of a kv head are summed in
the program (no atomics), as in block_sparse._bwd_dkdv_kernel, whose results this must equal.

Usage on the device: `python benchmarks/bwd_gluon.py [SEQ] [PATTERNS]` checks dK / dV against the production
backward on odd lengths, GQA, d 64/128 and masks, then times both dK/dV kernels alone (and the whole production
backward) at SEQ, bf16, 32 heads, d = 128. `aot` as the only
argument compiles for sm_90 here (no GPU) and prints registers, spills, shared memory and SASS counts.
Background and the forward's numbers: benchmarks/NOTES-kernels.md (session 15)."""

import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from longattn.kernels import block_sparse as kbs

LOG2E = 1.4426950408889634
ROWS = 64  # kv rows per consumer
QROWS = {128: 32, 64: 64}  # query rows per step by head_dim: at d = 128, 64-row slices spill (AOT: 46 STL at 240 regs)
NSLOT = 4  # Q/dO ring slots


@gluon.jit
def _producer(desc_q, desc_do, desc_k, desc_v, desc_dk, desc_dv, q_smem, do_smem, k_smem, v_smem, kv_bars, ready,
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
def _consumer_lo(desc_q, desc_do, desc_k, desc_v, desc_dk, desc_dv, q_smem, do_smem, k_smem, v_smem, kv_bars,
                 ready, empty, LSE, DELTA, s_lb, s_lh, IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch, b,
                 hk, kb, GROUP, qk_scale, sm_scale, SEQ_Q):
    _consume(desc_q, desc_do, desc_k, desc_v, desc_dk, desc_dv, q_smem, do_smem, k_smem, v_smem, kv_bars, ready,
             empty, LSE, DELTA, s_lb, s_lh, IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch, b, hk, kb,
             GROUP, qk_scale, sm_scale, SEQ_Q, 0)


@gluon.jit
def _consumer_hi(desc_q, desc_do, desc_k, desc_v, desc_dk, desc_dv, q_smem, do_smem, k_smem, v_smem, kv_bars,
                 ready, empty, LSE, DELTA, s_lb, s_lh, IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch, b,
                 hk, kb, GROUP, qk_scale, sm_scale, SEQ_Q):
    _consume(desc_q, desc_do, desc_k, desc_v, desc_dk, desc_dv, q_smem, do_smem, k_smem, v_smem, kv_bars, ready,
             empty, LSE, DELTA, s_lb, s_lh, IDX, CNT, FULL, TID, TILES, s_ib, s_ih, s_im, s_cb, s_ch, b, hk, kb,
             GROUP, qk_scale, sm_scale, SEQ_Q, 1)


@gluon.jit
def _consume(desc_q, desc_do, desc_k, desc_v, desc_dk, desc_dv, q_smem, do_smem, k_smem, v_smem, kv_bars, ready,
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
    gl.warp_specialize([(_producer, args), (_consumer_lo, args), (_consumer_hi, args)], [4, 4], [240, 240])


def dkdv(q, k, v, do, lse, delta, bs, scale: float):
    """dK, dV by the Gluon kernel (lse, delta as the production backward has them: [B, H, S] fp32 contiguous)."""
    from longattn.kernels.block_sparse_gluon import descriptor

    B, H, Sq, D = q.shape
    Hkv = k.shape[1]
    dk, dv = torch.empty_like(k), torch.empty_like(v)

    def desc(t, rows=ROWS):
        return descriptor(t, rows)

    lists = kbs._list_args(tuple(bs.transposed()))
    _bwd_dkdv_ws_kernel[(len(bs.kv_blocks), B * Hkv)](
        desc(q, QROWS[D]), desc(do, QROWS[D]), desc(k), desc(v), desc(dk), desc(dv), lse, delta, lse.stride(0),
        lse.stride(1), *lists[:4], kbs._tiles(bs), *lists[4:], scale * LOG2E, scale, Hkv, H // Hkv, Sq, NS=NSLOT,
        num_warps=4)
    return dk, dv


def production_dkdv(q, k, v, do, lse, delta, bs, scale: float):
    """The production dK/dV kernel alone, launched as block_sparse_backward launches it (no bias, plain batch)."""
    B, H, Sq, D = q.shape
    Hkv = k.shape[1]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    lists = kbs._list_args(tuple(bs.transposed()))
    bq, bkv = bs.block_size
    kbs._bwd_dkdv_kernel[(len(bs.kv_blocks), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, q, q, q,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), lse.stride(0), lse.stride(1),
        *(0,) * 6, *lists[:4], kbs._tiles(bs), *lists[4:],
        bs.q_blocks.starts, bs.q_blocks.lens, bs.kv_blocks.starts, bs.kv_blocks.lens,
        scale, Hkv, H // Hkv, Sq, k.shape[2], BLOCK_Q=bq, BLOCK_KV=bkv, HEAD_DIM=D, HAS_BIAS=False, RANK=16,
        PREC=kbs._prec(q), DTYPE_KEY=str(q.dtype), PACKED=bs.varlen)
    return dk, dv


def aot() -> None:
    """Compile for sm_90 on this machine and print the resource report and SASS counts."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from longattn.kernels.block_sparse_gluon import descriptor

    bin_dir = triton.backends.nvidia.__path__[0] + "/bin"
    for D in (128, 64):
        x = torch.zeros(1, 1, 256, D, dtype=torch.bfloat16)

        def d(rows, x=x):
            return mangle_type(descriptor(x, rows))

        fn = _bwd_dkdv_ws_kernel
        sig = dict.fromkeys(fn.arg_names, "i32")
        sig.update({n: d(ROWS) for n in ("desc_k", "desc_v", "desc_dk", "desc_dv")})
        sig.update({n: d(QROWS[D]) for n in ("desc_q", "desc_do")})
        sig.update(LSE="*fp32", DELTA="*fp32", IDX="*i32", CNT="*i32", FULL="*i32", TID="*i32", TILES="*i32",
                   qk_scale="fp32", sm_scale="fp32", NS="constexpr")
        k = triton.compile(GluonASTSource(fn, sig, {"NS": NSLOT}), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            sass = subprocess.run([f"{bin_dir}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
        counts = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "WARPGROUP.DEPBAR", "BAR.SYNC",
                                                                    "MUFU.EX2", "LDL", "STL")}
        print(f"d={D} smem {k.metadata.shared} {counts}")


def check() -> bool:
    """dK, dV against the production backward on the same inputs (max abs difference, bf16/fp16 rounding)."""
    from longattn import masks
    from longattn.masks.block_sparse import BlockSparse

    ok = True
    cases = [
        (1, 4, 4, 1000, 128, torch.bfloat16, masks.causal()),
        (2, 8, 2, 4097, 128, torch.float16, masks.causal()),
        (1, 8, 1, 3000, 64, torch.bfloat16, masks.sliding_window(700)),
        (1, 4, 4, 2048, 128, torch.bfloat16, masks.sinks(4, 300)),
        (1, 4, 2, 1500, 128, torch.bfloat16, lambda b, h, q, kv: ((q * 7 + kv * 13 + h) % 5 != 0) & (kv <= q)),
    ]
    for B, H, Hk, S, D, dt, mask in cases:
        g = torch.Generator(device="cuda").manual_seed(S)
        q, do = (torch.randn(B, H, S, D, device="cuda", dtype=dt, generator=g) for _ in range(2))
        k, v = (torch.randn(B, Hk, S, D, device="cuda", dtype=dt, generator=g) for _ in range(2))
        bs = BlockSparse.from_mask_mod(mask, B, H, S, S, 128, device="cuda")
        out, lse = kbs.block_sparse_forward(q, k, v, bs, D ** -0.5)
        _, rk, rv, _, _ = kbs.block_sparse_backward(do, q, k, v, out, lse, None, bs, D ** -0.5)
        dk, dv = dkdv(q, k, v, do, lse.contiguous(), kbs._delta(out, do, None), bs, D ** -0.5)
        torch.cuda.synchronize()
        ek = ((dk.float() - rk.float()).abs().max() / rk.float().abs().max()).item()
        ev = ((dv.float() - rv.float()).abs().max() / rv.float().abs().max()).item()
        good = ek < 2e-2 and ev < 2e-2 and not (dk.isnan().any() or dv.isnan().any())
        ok &= good
        print(f"check B{B} H{H}/{Hk} S{S} d{D} {str(dt)[6:]}: dk {ek:.2e} dv {ev:.2e} (relative to max) "
              f"{'ok' if good else 'WRONG'}", flush=True)
    return ok


def main() -> None:
    from triton.testing import do_bench

    from longattn.bench.kernels import PATTERNS
    from longattn.masks.block_sparse import BlockSparse

    S = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["sliding_window", "sink_window", "dilated", "random_90"]
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    if not check():
        print("Gluon dK/dV differs from the production backward; timing anyway")
    H, D, dt = 32, 128, torch.bfloat16
    q, k, v, do = (torch.randn(1, H, S, D, device="cuda", dtype=dt) for _ in range(4))
    for pat in names:
        bs = BlockSparse.from_mask_mod(PATTERNS[pat](S, H, 128, "cuda"), 1, H, S, S, 128, device="cuda")
        out, lse = kbs.block_sparse_forward(q, k, v, bs, D ** -0.5)
        delta = kbs._delta(out, do, None)
        whole = do_bench(lambda b=bs, o=out, m=lse: kbs.block_sparse_backward(do, q, k, v, o, m, None, b, D ** -0.5),
                         warmup=20, rep=200, return_mode="median")
        prod = do_bench(lambda b=bs, m=lse, e=delta: production_dkdv(q, k, v, do, m, e, b, D ** -0.5), warmup=20,
                        rep=200, return_mode="median")
        ours = do_bench(lambda b=bs, m=lse, e=delta: dkdv(q, k, v, do, m, e, b, D ** -0.5), warmup=20, rep=200,
                        return_mode="median")
        print(f"{pat:15s} whole production backward {whole:8.3f} ms | dK/dV: production {prod:8.3f} ms, "
              f"Gluon {ours:8.3f} ms ({prod / ours:.2f}x)", flush=True)

if __name__ == "__main__":
    aot() if sys.argv[1:] == ["aot"] else main()
