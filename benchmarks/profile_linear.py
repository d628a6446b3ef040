"""Per-kernel GPU time of the linear-attention forward (and optionally forward+backward) in decay mode, bf16,
16 heads, d=128, over shapes of equal tokens run in one process in the order given (the bench's order: 4k first,
so autotuning sees the same history), next to triton's do_bench and back-to-back wall time.

    PYTHONPATH=src python3 benchmarks/profile_linear.py [--shapes 4096x256,65536x16,1048576x1]
        [--target-rows 256,512] [--backward]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import longattn.kernels.linear_triton as lt
from longattn.kernels.linear import linear_attention

HEADS, DIM = 16, 128


def _profile(step, label: str) -> None:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 5 * 1e3
    bench = do_bench(step, warmup=25, rep=100, return_mode="median")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"=== {label}: back-to-back {wall:.2f} ms, do_bench {bench:.2f} ms", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=40), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x256,65536x16,1048576x1", help="SEQxBATCH, comma list, run in order")
    ap.add_argument("--target-rows", default=str(lt.TARGET_ROWS), help="comma list of linear_triton.TARGET_ROWS")
    ap.add_argument("--backward", action="store_true", help="also profile forward+backward")
    args = ap.parse_args()
    dev = "cuda"
    decay = 1 - torch.exp2(-5 - torch.arange(HEADS, device=dev, dtype=torch.float32) * 5 / HEADS)
    for rows in (int(r) for r in args.target_rows.split(",")):
        lt.TARGET_ROWS = rows
        for shape in args.shapes.split(","):
            seq, batch = (int(x) for x in shape.split("x"))
            leaves = [torch.randn(batch, HEADS, seq, DIM, device=dev, dtype=torch.bfloat16).requires_grad_()
                      for _ in range(3)]

            def fwd(leaves=leaves):
                return linear_attention(*leaves, decay=decay, impl="triton")[0]

            with torch.no_grad():
                _profile(fwd, f"fwd B={batch} S={seq} TARGET_ROWS={rows}")
            if args.backward:
                do = torch.randn_like(leaves[2])
                _profile(lambda fwd=fwd, leaves=leaves, do=do: torch.autograd.grad(fwd(), leaves, do),
                         f"fwd+bwd B={batch} S={seq} TARGET_ROWS={rows}")
            del leaves, fwd
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
