"""DHSA: oracle rule on its sparsity, reported density, dense at a full budget, planted chunks, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from longattn.masks.block_sparse import BlockSparse
from longattn.masks.core import MaskMod
from longattn.methods.prefill.dhsa import DHSA, chunk_ids, chunk_pair_bounds
from longattn.methods.registry import get
from tests.methods.prefill_checks import SHAPES, check_keeps_everything, check_standard, qkv


@pytest.mark.parametrize(("Sq", "Skv", "Hq", "Hkv", "D", "dtype"), SHAPES)
def test_oracle_and_density(Sq, Skv, Hq, Hkv, D, dtype):
    check_standard(DHSA(budget=64, chunk_size=16, block=32), Sq, Skv, Hq, Hkv, D, dtype)


@pytest.mark.parametrize(("Sq", "Skv"), [(300, 300), (130, 300)])
def test_full_budget_is_dense(Sq, Skv):
    q, k, v = qkv(Sq, Skv)
    check_keeps_everything(DHSA(budget=Skv, chunk_size=16, block=32).estimate(q, k), q, k, v)


def test_boundaries_follow_a_change_of_keys():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    k = torch.cat([a + 0.05 * torch.randn(70, 32, generator=g), b + 0.05 * torch.randn(90, 32, generator=g)])
    ids, n = chunk_ids(k.view(1, 1, 160, 32), chunk_size=64)
    assert n == 3
    assert ids[0, 69] != ids[0, 70]  # the content change at 70 is a chunk boundary
    assert bool((ids[0, 1:] >= ids[0, :-1]).all()) and int(ids[0, -1]) == n - 1


@given(S=st.integers(2, 300), chunk=st.integers(2, 70), seed=st.integers(0, 2**16))
def test_chunks_are_contiguous_and_bounded(S, chunk, seed):
    k = torch.randn(2, 2, S, 8, generator=torch.Generator().manual_seed(seed))
    ids, n = chunk_ids(k, chunk)
    assert ids.shape == (2, S) and int(ids[:, 0].max()) == 0 and bool((ids[:, -1] == n - 1).all())
    steps = ids[:, 1:] - ids[:, :-1]
    assert bool(((steps == 0) | (steps == 1)).all())
    lengths = torch.stack([torch.bincount(row, minlength=n) for row in ids])
    assert int(lengths.min()) >= 1 and int(lengths.max()) <= 2 * chunk - 1


def test_planted_relevant_chunk_is_selected():
    q, k, _ = qkv(512, Hq=2, Hkv=2)
    u = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(4)), dim=0)
    q[:, :, 448:] += 3 * u
    k[:, :, 100:140] += 3 * u  # the last queries care about keys 100..139
    bs = DHSA(budget=96, chunk_size=32, block=64).estimate(q, k)
    allowed = bs.to_dense()[0]
    assert allowed[:, 448:, 110:130].all()
    assert allowed[:, 448:, 200:400].float().mean() < 0.5


def test_registered_and_bad_input():
    assert get("dhsa").factory is DHSA
    for kwargs, match in [({"budget": 0}, "budget: expected an int >= 1"),
                          ({"chunk_size": 1}, "chunk_size: expected an int >= 2"),
                          ({"block": 100}, "block: expected a power of two")]:
        with pytest.raises(ValueError, match=match):
            DHSA(**kwargs)
    q, k, _ = qkv(100)
    with pytest.raises(ValueError, match=r"budget: budget of 2048 tokens exceeds the context of 100 tokens"):
        DHSA().estimate(q, k)
    with pytest.raises(ValueError, match=r"chunk_size: budget of 128 tokens exceeds"):
        DHSA(budget=50, chunk_size=128).estimate(q, k)


@pytest.mark.parametrize(("Sq", "Skv", "batch", "chunk"), [(300, 300, 1, 16), (130, 300, 2, 16), (333, 333, 2, 5)])
def test_chunk_bounds_and_tiles_are_exact(Sq, Skv, batch, chunk):
    """Blocks classified by the chunk-pair bounds and tiles packed from the chunk structure equal token-by-token
    evaluation of the same rule (short chunks: a block spans many)."""
    pairs = [qkv(Sq, Skv, seed=s) for s in range(batch)]
    q, k = (torch.cat([p[i] for p in pairs]) for i in (0, 1))
    bs = DHSA(budget=64, chunk_size=chunk, block=32).estimate(q, k)
    unbounded = MaskMod(bs.mask_mod.fn)  # the same predicate without bounds: every block evaluated elementwise
    ref = BlockSparse.from_mask_mod(unbounded, batch, 4, Sq, Skv, 32, device=q.device)
    assert torch.equal(bs.to_dense(), ref.to_dense())


@given(n_q=st.integers(1, 6), n_k=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_chunk_pair_bounds_are_exact(n_q, n_k, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(2, 3, n_q, n_k, generator=g) < 0.6
    q_ids = torch.sort(torch.randint(0, n_q, (2, 40), generator=g), dim=1).values
    k_ids = torch.sort(torch.randint(0, n_k, (2, 50), generator=g), dim=1).values
    bounds = chunk_pair_bounds(keep, q_ids, k_ids)
    q_lo, q_hi = sorted(torch.randint(0, 40, (2,), generator=g).tolist())
    kv_lo, kv_hi = sorted(torch.randint(0, 50, (2,), generator=g).tolist())
    b, h = torch.arange(2).view(-1, 1), torch.arange(3).view(1, -1)
    any_, all_ = bounds(b, h, torch.tensor(q_lo), torch.tensor(q_hi), torch.tensor(kv_lo), torch.tensor(kv_hi))
    qi, ki = torch.arange(q_lo, q_hi + 1), torch.arange(kv_lo, kv_hi + 1)
    for bi in range(2):
        for hi in range(3):
            pairs = keep[bi, hi][q_ids[bi, qi].view(-1, 1), k_ids[bi, ki].view(1, -1)]
            assert bool(any_[bi, hi]) == bool(pairs.any()) and bool(all_[bi, hi]) == bool(pairs.all())
