"""Forward paths on one GPU call: the generic kernel (autotuned) against the TMA kernel at every forced config
(warps, stages), beside cuDNN dense causal and (unless "noflex") compiled FlexAttention,
at one length. Each TMA config is checked against the generic output in the same run.
Usage: fwd_tma_sweep.py [SEQ] [PATTERNS] [noflex]. Notes go to benchmarks/NOTES-kernels.md."""

import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention
from triton.testing import do_bench

from longattn.bench.kernels import PATTERNS
from longattn.kernels import block_sparse as kbs
from longattn.masks.block_sparse import BlockSparse

S = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["causal", "sliding_window", "random_90"]
H, D, dev, dt = 32, 128, "cuda", torch.bfloat16
CONFIGS = [(8, 2), (8, 3)]  # warps, stages
FLEX = "noflex" not in sys.argv
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())


def bench(fn) -> float:
    return do_bench(fn, warmup=50, rep=400, return_mode="median")


def forced_tma(q, k, v, bs, cfg):
    """One launch of the TMA kernel at a forced (warps, stages)."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=dev)
    w, st = cfg
    grid, args, consts = kbs._fwd_tma_args(q, k, v, out, lse, bs, q.shape[-1] ** -0.5)
    kbs._fwd_tma_kernel.fn[grid](*args, **consts, num_warps=w, num_stages=st)
    return out, lse


q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=dt) for _ in range(3))
with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    cudnn = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
causal_fl = 4 * H * (S * (S + 1) / 2) * D
print(f"cudnn causal: {cudnn:.2f} ms {causal_fl / cudnn / 1e9:.0f} TF")
table = []
for name in names:
    bs = BlockSparse.from_mask_mod(PATTERNS[name](S, H, 128, dev), 1, H, S, S, 128, device=dev)
    area = bs.density() * S * S
    fl, ideal = 4 * H * area * D, cudnn * area / (S * (S + 1) / 2)
    ref, _ = kbs.block_sparse_forward(q, k, v, bs, D ** -0.5, path="generic")
    res = {"generic": bench(lambda b=bs: kbs.block_sparse_forward(q, k, v, b, D ** -0.5, path="generic"))}
    print(f"== {name} density_vs_causal {area / (S * (S + 1) / 2):.3f}; generic picked {kbs._fwd_kernel.best_config}")
    for cfg in CONFIGS:
        try:
            o, _ = forced_tma(q, k, v, bs, cfg)
            err = (o.float() - ref.float()).abs().max().item()
            print(f"tma {cfg}: max abs diff vs generic {err:.2e}")
            if err > 3e-2 or torch.isnan(o).any():
                print(f"tma {cfg}: WRONG")
                continue
            res[f"tma{cfg}"] = bench(lambda b=bs, c=cfg: forced_tma(q, k, v, b, c))
        except Exception as e:  # noqa: BLE001
            print(f"tma {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}")
    o, _ = kbs.block_sparse_forward(q, k, v, bs, D ** -0.5)
    res["tma-autotuned"] = bench(lambda b=bs: kbs.block_sparse_forward(q, k, v, b, D ** -0.5))
    print("tma autotune picked", kbs._fwd_tma_kernel.best_config)
    if FLEX:
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False)
        bm = bs.to_flex()
        res["flex"] = bench(lambda f=flex, m=bm: f(q, k, v, block_mask=m))
    for key, ms in res.items():
        line = (f"{name:15s} {key:24s} {ms:8.3f} ms {fl / ms / 1e9:5.0f} TF  frac_ideal {ideal / ms:.3f}  "
                f"x_flex {res['flex'] / ms if FLEX else float('nan'):.3f}")
        print(line)
        table.append(line)
    kbs._fwd_kernel.cache.clear()
    kbs._fwd_tma_kernel.cache.clear()
print("\n".join(table))
