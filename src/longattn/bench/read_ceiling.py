"""A bandwidth yardstick for decode rows: one launch that only streams the same K and V bytes from HBM (a wide
load and a sum per program, no attention math), timed exactly like the contenders. What it reaches at a given
size is what any single-pass read of those bytes can reach on that device there; at short caches that is well
under the datasheet peak (launch, ramp-up and tail of a few-microsecond grid), which the HBM fraction alone hides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

READ_BLOCK = 8192  # elements per program and tensor: 16 KB of bf16 from K and from V each


@triton.jit
def _read_kernel(K, V, OUT, n, BLOCK: tl.constexpr):
    """Program i sums elements [i·BLOCK, (i+1)·BLOCK) of K and of V (fp32) and writes the one number."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    k = tl.load(K + offs, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(V + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + tl.program_id(0), tl.sum(k, 0) + tl.sum(v, 0))


def read_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Stream contiguous k and v (same number of elements) once; returns the per-program sums (to keep the loads)."""
    if not (k.is_contiguous() and v.is_contiguous()) or k.numel() != v.numel():
        raise ValueError(f"k/v: expected two contiguous tensors of equal size, got {tuple(k.shape)} "
                         f"(contiguous={k.is_contiguous()}) and {tuple(v.shape)} (contiguous={v.is_contiguous()})")
    n = k.numel()
    grid = triton.cdiv(n, READ_BLOCK)
    out = torch.empty(grid, dtype=torch.float32, device=k.device)
    _read_kernel[(grid,)](k, v, out, n, BLOCK=READ_BLOCK, num_warps=8)
    return out
