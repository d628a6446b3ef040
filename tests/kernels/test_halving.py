"""HiP's halving search: the Triton kernel (interpreted on CPU) against the torch version it replaces on CUDA."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from longattn.kernels.halving import halving_search, halving_search_reference, halving_steps

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on the GPU, interpreted on CPU


def _canonical(picks: Tensor, n_blocks: int) -> Tensor:
    """Picks in ascending order with the -1 pads last (the kernel keeps them by rank, torch by topk order)."""
    return torch.where(picks < 0, n_blocks, picks).sort(-1).values



@given(B=st.integers(1, 2), H=st.integers(1, 3), rows=st.integers(1, 6), n_blocks=st.integers(1, 300),
       k=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_kernel_picks_what_the_torch_search_picks(B, H, rows, n_blocks, k, seed):
    """Distinct random scores (no ties), reaches from 1 to every block, k below, at and above the reach."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, rows, n_blocks, generator=g)
    reach = torch.randint(1, n_blocks + 1, (rows,), generator=g)
    got = halving_search(scores.to(DEVICE), reach.to(DEVICE), k, impl="triton").cpu()
    want = halving_search_reference(scores, reach, k)
    assert got.shape == want.shape == (B, H, rows, k)
    assert torch.equal(_canonical(got, n_blocks), _canonical(want, n_blocks))


@given(rows=st.integers(1, 6), n_blocks=st.integers(1, 200), k=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_search_range_with_a_start(rows, n_blocks, k, seed):
    """Rows searching [start, reach) (HiP skips the sink and window blocks): the kernel picks what torch picks,
    every pick lies in the range, and a range of at most k blocks is kept whole (empty ranges pick nothing)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 2, rows, n_blocks, generator=g)
    start = torch.randint(0, n_blocks + 1, (rows,), generator=g)
    reach = torch.minimum(start + torch.randint(-2, n_blocks + 1, (rows,), generator=g), torch.tensor(n_blocks))
    got = halving_search(scores.to(DEVICE), reach.to(DEVICE), k, start=start.to(DEVICE), impl="triton").cpu()
    want = halving_search_reference(scores, reach, k, start)
    assert torch.equal(_canonical(got, n_blocks), _canonical(want, n_blocks))
    lo, hi = start.view(1, 1, -1, 1), reach.view(1, 1, -1, 1)
    assert ((want < 0) | ((want >= lo) & (want < hi))).all()
    size = (reach - start).clamp(min=0)
    assert torch.equal((want >= 0).sum(-1), torch.minimum(size, torch.tensor(k)).view(1, 1, -1).expand(2, 2, -1))


def test_kernel_reads_bfloat16_scores():
    """GEMM output in bf16 (how HiP scores 16-bit inputs): same picks as torch on the same bf16 values; values
    spaced so bf16 keeps them distinct."""
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    scores = (perm.float() / 8).view(1, 1, 1, 64).expand(1, 2, 3, 64).to(torch.bfloat16)
    reach = torch.tensor([64, 40, 9])
    got = halving_search(scores.to(DEVICE), reach.to(DEVICE), 5, impl="triton").cpu()
    assert torch.equal(_canonical(got, 64), _canonical(halving_search_reference(scores, reach, 5), 64))


@pytest.mark.parametrize(("n_blocks", "k", "steps"), [(1, 1, 0), (16, 16, 0), (17, 16, 1), (32, 16, 1),
                                                       (33, 16, 2), (4096, 16, 8), (4097, 16, 9)])
def test_step_count_brings_every_chunk_to_one_block(n_blocks, k, steps):
    assert halving_steps(n_blocks, k) == steps


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="scores/reach"):
        halving_search(torch.zeros(1, 1, 4, 8), torch.ones(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"^start: expected \[rows\]"):
        halving_search(torch.zeros(1, 1, 4, 8), torch.ones(4, dtype=torch.long), 2, start=torch.zeros(3))
    with pytest.raises(ValueError, match="impl"):
        halving_search(torch.zeros(1, 1, 4, 8), torch.ones(4, dtype=torch.long), 2, impl="cuda")
    with pytest.raises(ValueError, match="k: the Triton search"):
        halving_search(torch.zeros(1, 1, 4, 300, device=DEVICE), torch.ones(4, dtype=torch.long, device=DEVICE), 129,
                       impl="triton")
