"""Each backward kernel alone on one GPU call: the Triton dQ and dK/dV kernels (block_sparse._bwd_dq_kernel /
_bwd_dkdv_kernel) against the Hopper Gluon ones (kernels/block_sparse_gluon_bwd.py), and the whole backward on
both paths. First the Gluon gradients are checked against the Triton ones on odd lengths, GQA, d 64/128 and masks
(outputs NaN-filled, so anything left unwritten shows). `longattn bench kernels --directions bwd` gives the
anchored numbers (FlexAttention, cuDNN); this script says which kernel moved.
Usage on the device: python benchmarks/bwd_gluon.py [SEQ] [PATTERNS]   (bf16, 32 heads, d = 128)"""

import sys

import torch
from triton.testing import do_bench

from longattn import masks
from longattn.bench.kernels import PATTERNS
from longattn.kernels import block_sparse as kbs
from longattn.kernels import block_sparse_gluon_bwd as kbgb
from longattn.masks.block_sparse import BlockSparse


def triton_kernels(q, k, v, do, lse, delta, bs, scale: float):
    """Zero-bias launches of the Triton dQ and dK/dV kernels, as block_sparse_backward makes them."""
    B, H, Sq, D = q.shape
    Hkv = k.shape[1]
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    common = dict(HEAD_DIM=D, HAS_BIAS=False, RANK=16, PREC=kbs._prec(q), DTYPE_KEY=str(q.dtype), PACKED=False)
    spans = (bs.q_blocks.starts, bs.q_blocks.lens, bs.kv_blocks.starts, bs.kv_blocks.lens)
    bq, bkv = bs.block_size
    lists = kbs._q_lists(bs)
    kbs._bwd_dq_kernel[(len(bs.q_blocks), B * H)](
        q, k, v, do, lse, delta, dq, q, q, q, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *lse.stride()[:2],
        *(0,) * 6, *lists[:4], kbs._tiles(bs), *lists[4:], *spans, scale, H, H // Hkv, Sq, k.shape[2],
        BLOCK_Q=bq, BLOCK_KV=bkv, **common)
    tl_lists = kbs._kv_lists(bs)
    kbs._bwd_dkdv_kernel[(len(bs.kv_blocks), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, q, q, q, *q.stride()[:3], *k.stride()[:3], *lse.stride()[:2], *(0,) * 6,
        *tl_lists[:4], kbs._tiles(bs), *tl_lists[4:], *spans, scale, Hkv, H // Hkv, Sq, k.shape[2],
        BLOCK_Q=bq, BLOCK_KV=bkv, **common)
    return dq, dk, dv


def gluon_kernels(q, k, v, do, lse, delta, bs, scale: float, which: str = "both"):
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    tiles = kbs._tiles(bs)
    if which in ("both", "dq"):
        kbgb.gluon_dq(q, k, v, do, lse, delta, dq, bs, scale, kbs._q_lists(bs), tiles)
    if which in ("both", "dkdv"):
        kbgb.gluon_dkdv(q, k, v, do, lse, delta, dk, dv, bs, scale, kbs._kv_lists(bs), tiles)
    return dq, dk, dv


def check() -> bool:
    """Gluon dq, dk, dv against the Triton kernels' on the same inputs (max difference relative to the largest)."""
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
        delta = kbs._delta(out, do, None)
        want = triton_kernels(q, k, v, do, lse, delta, bs, D ** -0.5)
        got = gluon_kernels(q, k, v, do, lse, delta, bs, D ** -0.5)
        errs = [float((a.float() - b.float()).abs().max() / b.float().abs().max())
                for a, b in zip(got, want, strict=True)]
        good = all(e < 2e-2 for e in errs)  # NaN (unwritten) compares False
        ok &= good
        print(f"check B{B} H{H}/{Hk} S{S} d{D} {str(dt)[6:]}: dq {errs[0]:.2e} dk {errs[1]:.2e} dv {errs[2]:.2e} "
              f"{'ok' if good else 'WRONG'}", flush=True)
    return ok


def ms(fn) -> float:
    return do_bench(fn, warmup=20, rep=200, return_mode="median")


def time_pattern(pat: str, q, k, v, do) -> str:
    S, scale = q.shape[2], q.shape[-1] ** -0.5
    bs = BlockSparse.from_mask_mod(PATTERNS[pat](S, q.shape[1], 128, "cuda"), 1, q.shape[1], S, S, 128,
                                   device="cuda")
    out, lse = kbs.block_sparse_forward(q, k, v, bs, scale)
    delta = kbs._delta(out, do, None)
    whole = {p: ms(lambda p=p: kbs.block_sparse_backward(do, q, k, v, out, lse, None, bs, scale, path=p))
             for p in ("generic", "gluon")}
    both = ms(lambda: triton_kernels(q, k, v, do, lse, delta, bs, scale))
    g_dq = ms(lambda: gluon_kernels(q, k, v, do, lse, delta, bs, scale, "dq"))
    g_dkdv = ms(lambda: gluon_kernels(q, k, v, do, lse, delta, bs, scale, "dkdv"))
    return (f"{pat:15s} whole backward: triton {whole['generic']:7.3f} ms, gluon {whole['gluon']:7.3f} ms "
            f"({whole['generic'] / whole['gluon']:.2f}x) | triton dQ+dK/dV {both:7.3f} | gluon dQ {g_dq:7.3f}, "
            f"dK/dV {g_dkdv:7.3f} ms")


def main() -> None:
    S = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["sliding_window", "sink_window", "dilated", "random_90"]
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    if not check():
        print("Gluon gradients differ from the Triton kernels'; timing anyway")
    q, k, v, do = (torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for pat in names:
        print(time_pattern(pat, q, k, v, do), flush=True)


if __name__ == "__main__":
    main()
