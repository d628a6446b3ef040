"""HiP's hierarchical halving search over a precomputed score matrix: per row, k chunks of the row's reachable
key blocks are halved step by step, keeping the k halves whose first block scores highest, until every chunk is
one block. ``halving_search`` runs it as one Triton program per row (all steps in registers, one launch) on CUDA
and as batched torch ops elsewhere (``halving_search_reference``, the kernel's oracle).

On the GPU the torch version costs ~12 launches per step and slice, which at 128k (8 steps) kept the host, not the
device, the bottleneck of HiP's estimation."""

from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

_MAX_TRITON_K = 128  # the kernel ranks 2k candidates pairwise ([2k, 2k] in registers); larger k runs in torch


def halving_steps(n_blocks: int, k: int) -> int:
    """Halving steps after which every chunk of at most ceil(n_blocks / k) blocks is one block long."""
    return (math.ceil(n_blocks / k) - 1).bit_length()


def halving_search_reference(scores: Tensor, reach: Tensor, k: int, start: Tensor | None = None) -> Tensor:
    """int64 [B, H, rows, k]: the search in torch over scores [B, H, rows, nKB] (row i may pick blocks
    [start[i], reach[i]), start 0 by default); chunk starts that survive, -1 for chunks left empty (fewer than k
    blocks in range)."""
    B, H, rows, nKB = scores.shape
    j = torch.arange(k, device=scores.device)
    lo = torch.zeros_like(reach) if start is None else start
    lo = lo.view(-1, 1).long()
    n = (reach.view(-1, 1).long() - lo).clamp(min=0)
    starts = (lo + j * n // k).expand(B, H, rows, k)
    ends = (lo + (j + 1) * n // k).expand(B, H, rows, k)
    # a host-known step count, so the search never waits on the device (steps after every chunk is one block
    # long keep the same k blocks)
    for _ in range(halving_steps(nKB, k)):
        mid = (starts + ends + 1) // 2
        s2, e2 = torch.cat([starts, mid], -1), torch.cat([mid, ends], -1)
        # each half is represented by its first block (the release's 'first' sampling)
        score = scores.gather(-1, s2.clamp(0, nKB - 1)).masked_fill(e2 <= s2, float("-inf"))
        top = score.topk(k, dim=-1).indices
        starts, ends = s2.gather(-1, top), e2.gather(-1, top)
    return torch.where(ends > starts, starts, -1)


@triton.jit
def _halving_kernel(S, START, REACH, OUT, rows, n_kb, k, KP: tl.constexpr):
    """One row of scores: chunk bounds live in registers; each step ranks the 2k halves pairwise (score, then
    candidate position) and the k best become the next chunks. A row stops once its longest chunk is one block
    (rows with a short reach need fewer steps than the longest row)."""
    row = tl.program_id(0)
    lo = tl.load(START + row % rows).to(tl.int64)
    n = tl.maximum(tl.load(REACH + row % rows).to(tl.int64) - lo, 0)
    j = tl.arange(0, KP)
    live = j < k
    starts = tl.where(live, lo + j * n // k, 0)
    ends = tl.where(live, lo + (j + 1) * n // k, 0)
    pos = tl.arange(0, 2 * KP)
    base = S + row.to(tl.int64) * n_kb
    longest = (n + k - 1) // k
    while longest > 1:
        longest = (longest + 1) // 2
        mid = (starts + ends + 1) // 2
        s2 = tl.reshape(tl.join(starts, mid), [2 * KP])
        e2 = tl.reshape(tl.join(mid, ends), [2 * KP])
        filled = e2 > s2
        score = tl.load(base + tl.minimum(s2, n_kb - 1), mask=filled, other=float("-inf")).to(tl.float32)
        score = tl.where(filled, score, float("-inf"))
        ahead = (score[None, :] > score[:, None]) | ((score[None, :] == score[:, None]) & (pos[None, :] < pos[:, None]))
        rank = tl.sum(ahead.to(tl.int32), 1)
        take = (rank[None, :] == j[:, None]) & live[:, None]  # slot j < k takes the candidate ranked j
        bounds = tl.sum(tl.where(take, (s2 << 32 | e2)[None, :], 0), 1)  # both bounds in one reduction
        starts, ends = bounds >> 32, bounds & 0xFFFFFFFF
    tl.store(OUT + row.to(tl.int64) * k + j, tl.where(ends > starts, starts, -1), mask=live)


def halving_search(scores: Tensor, reach: Tensor, k: int, *, start: Tensor | None = None,
                   impl: str = "auto") -> Tensor:
    """int64 [B, H, rows, k]: ``halving_search_reference``'s selection (ties between equal scores may resolve
    differently); row i searches blocks [start[i], reach[i]). ``impl``: "auto" (Triton on CUDA when k <= 128,
    torch otherwise), "triton", "reference"."""
    if scores.dim() != 4 or reach.shape != (scores.shape[2],):
        raise ValueError(f"scores/reach: expected [B, H, rows, nKB] and [rows], got {tuple(scores.shape)} and "
                         f"{tuple(reach.shape)}")
    if start is not None and start.shape != reach.shape:
        raise ValueError(f"start: expected [rows] = {tuple(reach.shape)} like reach, got {tuple(start.shape)}")
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl: got {impl!r}, expected 'auto', 'triton' or 'reference'")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if impl == "triton" and scores.device.type != "cuda" and not interpret:
        raise ValueError(f"impl='triton': scores are on {scores.device}; the Triton kernel needs CUDA")
    if impl == "triton" and k > _MAX_TRITON_K:
        raise ValueError(f"k: the Triton search takes k <= {_MAX_TRITON_K}, got {k}")
    use_triton = impl == "triton" or (impl == "auto" and scores.device.type == "cuda" and k <= _MAX_TRITON_K)
    if impl == "auto" and scores.device.type == "cuda" and not use_triton:  # a slow path on a GPU is never silent
        warnings.warn(f"halving_search: k={k} > {_MAX_TRITON_K} runs the torch search (~12 launches per step)",
                      RuntimeWarning, stacklevel=2)
    start = torch.zeros_like(reach) if start is None else start
    if not use_triton:
        return halving_search_reference(scores, reach, k, start)
    B, H, rows, nKB = scores.shape
    out = torch.empty(B, H, rows, k, dtype=torch.int64, device=scores.device)
    kp = triton.next_power_of_2(k)
    _halving_kernel[(B * H * rows,)](scores.contiguous(), start.contiguous(), reach.contiguous(), out, rows, nKB, k,
                                     KP=kp, num_warps=1 if kp <= 16 else 4)
    return out
