"""Per-kernel GPU time of the linear-attention forward (decay mode, bf16, 16 heads, d=128) at 64k x 16 and 1M x 1,
next to triton's do_bench and back-to-back wall time: where the 1M-token call spends what 64k does not.

    PYTHONPATH=src python3 benchmarks/profile_linear.py
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from longattn.kernels.linear import linear_attention

HEADS, DIM = 16, 128


def main() -> None:
    dev = "cuda"
    decay = 1 - torch.exp2(-5 - torch.arange(HEADS, device=dev, dtype=torch.float32) * 5 / HEADS)
    for batch, seq in ((16, 65536), (1, 1 << 20)):
        q, k, v = (torch.randn(batch, HEADS, seq, DIM, device=dev, dtype=torch.bfloat16) * DIM ** -0.5
                   for _ in range(3))

        def fn(q=q, k=k, v=v):
            return linear_attention(q, k, v, decay=decay, impl="triton")[0]

        with torch.no_grad():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / 5 * 1e3
            bench = do_bench(fn, warmup=25, rep=100, return_mode="median")
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
        print(f"=== fwd B={batch} S={seq}: back-to-back {wall:.2f} ms, do_bench {bench:.2f} ms")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=40))
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
