"""The Hopper Gluon forward (kernels/block_sparse_gluon.py) on one GPU call: first held equal to the Triton TMA
kernel over odd lengths, GQA, head dims and masks, then timed beside it and compiled FlexAttention at SEQ
(issue 2: forward >= 1.2x FlexAttention). The variants compared in session 15 (8-warp overlap, ping-pong, 2 vs 3
stages) are in commit aac53a5's copy of this script and the kernel module.
Usage: fwd_gluon.py [SEQ] [PATTERNS] [HEAD_DIM] [nocheck]. Notes: benchmarks/NOTES-kernels.md."""

import sys

import torch
import triton

from longattn import masks
from longattn.kernels import block_sparse as kbs
from longattn.masks.block_sparse import BlockSparse


def check() -> bool:
    """Gluon vs production TMA kernel: same inputs, max abs diff of outputs and LSE."""
    ok = True
    cases = [
        (1, 4, 4, 1000, 1000, 128, torch.bfloat16, masks.causal()),
        (2, 8, 2, 4097, 4097, 128, torch.float16, masks.causal()),
        (1, 8, 1, 4097, 4097, 64, torch.bfloat16, masks.sliding_window(700)),
        (1, 4, 4, 300, 1000, 128, torch.bfloat16, masks.causal()),
        (2, 4, 1, 2048, 2048, 128, torch.bfloat16, masks.sinks(4, 300)),
        (1, 4, 4, 1, 1, 128, torch.bfloat16, masks.causal()),
        (1, 4, 2, 3000, 3000, 64, torch.float16, masks.dilated(256, 3, granularity=128)),
        (1, 4, 4, 1500, 1500, 128, torch.bfloat16, lambda b, h, q, kv: ((q * 7 + kv * 13 + h) % 5 != 0) & (kv <= q)),
        (1, 2, 2, 1024, 1024, 128, torch.bfloat16, lambda b, h, q, kv: (q >= 512) & (kv <= q)),  # empty rows
    ]
    for B, H, Hk, Sq, Skv, D, dt, mask in cases:
        g = torch.Generator(device="cuda").manual_seed(Sq)
        q = torch.randn(B, H, Sq, D, device="cuda", dtype=dt, generator=g)
        k, v = (torch.randn(B, Hk, Skv, D, device="cuda", dtype=dt, generator=g) for _ in range(2))
        bs = BlockSparse.from_mask_mod(mask, B, H, Sq, Skv, 128, device="cuda")
        ref, ref_lse = kbs.block_sparse_forward(q, k, v, bs, D ** -0.5, path="tma")
        o, lse = kbs.block_sparse_forward(q, k, v, bs, D ** -0.5, path="gluon")
        torch.cuda.synchronize()
        finite = torch.isfinite(ref_lse)
        err = (o.float() - ref.float()).abs().max().item()
        lerr = (lse[finite] - ref_lse[finite]).abs().max().item() if finite.any() else 0.0
        same_inf = torch.equal(torch.isinf(lse), ~finite)
        good = err <= 2e-2 and lerr <= 1e-3 and same_inf and not torch.isnan(o).any()
        ok &= good
        print(f"check B{B} H{H}/{Hk} {Sq}x{Skv} d{D} {str(dt)[6:]}: out {err:.2e} lse {lerr:.2e} "
              f"{'ok' if good else 'WRONG'}", flush=True)
    return ok


def main() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention
    from triton.testing import do_bench

    from longattn.bench.kernels import PATTERNS

    S = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["causal", "sliding_window", "sink_window", "dilated",
                                                              "random_90"]
    print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    if "nocheck" not in sys.argv and not check():
        print("gluon kernel differs from the TMA kernel; timing anyway")
    D = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3].isdigit() else 128
    H, dev, dt = 32, "cuda", torch.bfloat16

    def bench(fn) -> float:
        return do_bench(fn, warmup=50, rep=300, return_mode="median")

    q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=dt) for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    print(f"cudnn causal: {cudnn:.2f} ms", flush=True)
    table = []
    for pat in names:
        bs = BlockSparse.from_mask_mod(PATTERNS[pat](S, H, 128, dev), 1, H, S, S, 128, device=dev)
        ideal = cudnn * bs.density() * S * S / (S * (S + 1) / 2)
        res = {path: bench(lambda b=bs, p=path: kbs.block_sparse_forward(q, k, v, b, D ** -0.5, path=p))
               for path in ("gluon", "tma")}
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False)
        bm = bs.to_flex()
        res["flex"] = bench(lambda f=flex, m=bm: f(q, k, v, block_mask=m))
        for key, ms in res.items():
            line = f"{pat:15s} {key:12s} {ms:8.3f} ms  frac_ideal {ideal / ms:.3f}  x_flex {res['flex'] / ms:.3f}"
            print(line, flush=True)
            table.append(line)
    print("\n".join(table))


if __name__ == "__main__":
    main()
