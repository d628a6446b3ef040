"""Config sensitivity of the block-sparse kernels on one GPU call: every forced (tile, warps, stages) for the
forward, dQ and dK/dV kernels on sliding-window and causal masks at 64k, beside compiled FlexAttention, plus the
config the autotuner picked. Tuning notes go to benchmarks/NOTES-kernels.md."""

import sys

import torch
import triton
from triton.testing import do_bench

from longattn import masks
from longattn.kernels import block_sparse as kbs
from longattn.masks.block_sparse import BlockSparse

S, H, D = int(sys.argv[1]) if len(sys.argv) > 1 else 65536, 32, 128
dev, dt = "cuda", torch.bfloat16
q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=dt) for _ in range(3))
do = torch.randn_like(q)


def fwd_with(bs, cfg):
    out = torch.empty_like(q)
    lse = torch.empty((1, H, S), dtype=torch.float32, device=dev)
    lists = kbs._q_lists(bs)
    bn, w, st = cfg
    kbs._fwd_kernel.fn[(len(bs.q_blocks), H)](
        q, k, v, out, lse, q, q, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *lse.stride()[:2], 0, 0, 0, 0, 0, 0, *lists[:4], kbs._tiles(bs), *lists[4:],
        bs.q_blocks.starts, bs.q_blocks.lens, bs.kv_blocks.starts, bs.kv_blocks.lens,
        D ** -0.5 * kbs.LOG2E, H, 1, S, S, BLOCK_Q=128, BLOCK_KV=128, BLOCK_N=bn, HEAD_DIM=D, HAS_BIAS=False,
        RANK=16, PREC="tf32", DTYPE_KEY=str(dt), PACKED=False, num_warps=w, num_stages=st)
    return out, lse


for name, mask in (("sliding", masks.sliding_window(4096)), ("causal", masks.causal())):
    bs = BlockSparse.from_mask_mod(mask, 1, H, S, S, 128, device=dev)
    area = bs.density() * S * S
    fl = 4 * H * area * D
    print(f"== {name} S={S} density={bs.density():.3f}")
    for cfg in [(64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 2), (64, 8, 3), (64, 8, 4), (128, 4, 2), (128, 8, 2),
                (128, 8, 3), (32, 4, 3), (32, 4, 4)]:
        try:
            ms = do_bench(lambda c=cfg, bs=bs: fwd_with(bs, c), warmup=25, rep=100, return_mode="median")
            print(f"fwd cfg {cfg}: {ms:.3f} ms {fl / ms / 1e9:.0f} TF")
        except Exception as e:  # out of resources for that config
            print(f"fwd cfg {cfg}: failed {str(e)[:80]}")
    o, lse = kbs.block_sparse_forward(q, k, v, bs, D ** -0.5, path="generic")
    print("autotuned fwd:", kbs._fwd_kernel.best_config)
    ms = do_bench(lambda o=o, lse=lse, bs=bs: kbs.block_sparse_backward(do, q, k, v, o, lse, None, bs, D ** -0.5),
                  warmup=25, rep=100, return_mode="median")
    print(f"bwd autotuned: {ms:.3f} ms {2.5 * fl / ms / 1e9:.0f} TF; dq {kbs._bwd_dq_kernel.best_config}; "
          f"dkdv {kbs._bwd_dkdv_kernel.best_config}")
    from torch.nn.attention.flex_attention import flex_attention
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    bm = bs.to_flex()
    ms = do_bench(lambda flex=flex, bm=bm: flex(q, k, v, block_mask=bm), warmup=25, rep=100, return_mode="median")
    print(f"flex fwd: {ms:.3f} ms {fl / ms / 1e9:.0f} TF; kernel options: {getattr(bm, 'BLOCK_SIZE', None)}")
    for kern in (kbs._fwd_kernel, kbs._bwd_dq_kernel, kbs._bwd_dkdv_kernel):
        kern.cache.clear()
print("triton", triton.__version__)
