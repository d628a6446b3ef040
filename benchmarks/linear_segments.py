"""Segment sensitivity of the chunked linear attention kernels on one GPU call: tokens/s (bf16, 16 heads, d=128,
1M tokens per call, per-head decay) at several lengths for several TARGET_ROWS (how many (segment, head) rows the
walk kernels get before sequences stop being cut), plus the configs the autotuner picked.
Usage: python benchmarks/linear_segments.py [LENGTHS...]"""

import sys

import torch
from triton.testing import do_bench

from longattn import linear_attention
from longattn.kernels import linear_triton as lt

H, D, TOKENS = 16, 128, 1 << 20
decay = 1 - torch.exp2(-5 - torch.arange(H, device="cuda", dtype=torch.float32) * 5 / H)


def measure(S: int) -> None:
    """Forward and forward+backward at length S (batch TOKENS // S) for each TARGET_ROWS."""
    B = TOKENS // S
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(v)
    for target in (256, 1024, 4096):
        lt.TARGET_ROWS = target
        fwd = do_bench(lambda: linear_attention(q, k, v, decay=decay, impl="triton"), return_mode="median")
        step = do_bench(lambda: torch.autograd.grad(linear_attention(q, k, v, decay=decay, impl="triton")[0],
                                                    [q, k, v], do), return_mode="median")
        print(f"S={S:>8} B={B:>4} target={target:>5} fwd {fwd:7.2f} ms {TOKENS / fwd / 1e3:6.1f} Mtok/s  "
              f"fwd+bwd {step:7.2f} ms {TOKENS / step / 1e3:6.1f} Mtok/s", flush=True)


for S in [int(x) for x in sys.argv[1:]] or [4096, 65536, 1048576]:
    measure(S)
    torch.cuda.empty_cache()
for kern in (lt._piece_state, lt._fwd_walk, lt._dq_walk, lt._dk_walk, lt._dv_walk):
    print(kern.fn.__name__, {str(key): str(cfg) for key, cfg in kern.cache.items()})
