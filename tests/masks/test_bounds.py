"""Rectangle bounds: sound on random rectangles (hypothesis), exact where promised, exact on aligned blocks."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from bound_checks import aligned, bounds_of, brute, check, ranges
from hypothesis import given, settings
from hypothesis import strategies as st
from mask_oracles import CASES, grids

from longattn import masks as M

BY_ID = {c.id: c for c in CASES}
SETTINGS = settings(max_examples=10, deadline=None)


@cache
def mask_and_dense(case_id: str) -> tuple[M.MaskMod, torch.Tensor]:
    case = BY_ID[case_id]
    mask = case.make()
    return mask, M.evaluate(mask, *grids(case.B, case.H, case.Q, case.K)).expand(case.B, case.H, case.Q, case.K)


def test_brute_counts_match_slicing():
    """The prefix-sum oracle of rectangle any/all agrees with slicing the dense mask."""
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(2, 3, 11, 13, generator=g) < 0.3
    q_rng, kv_rng = [(0, 10), (3, 3), (4, 7)], [(0, 0), (2, 12), (5, 6)]
    any_, all_ = brute(dense, q_rng, kv_rng)
    for i, (ql, qh) in enumerate(q_rng):
        for j, (kl, kh) in enumerate(kv_rng):
            sub = dense[:, :, ql:qh + 1, kl:kh + 1].flatten(2)
            assert torch.equal(any_[:, :, i, j], sub.any(-1)) and torch.equal(all_[:, :, i, j], sub.all(-1))


# three grids per 1-D family (square small, square larger, short-wide) keep the hypothesis run short;
# the aligned-block test below and the oracle tests cover every case
BOUNDS_CASES = [c for c in CASES if not c.id.endswith(("-7x7", "-1x1", "-33x70"))]


@pytest.mark.parametrize("case", BOUNDS_CASES, ids=[c.id for c in BOUNDS_CASES])
@SETTINGS
@given(data=st.data())
def test_bounds_sound_on_random_rectangles(case, data):
    mask = mask_and_dense(case.id)[0]
    q_rng = data.draw(ranges(case.Q), label="q ranges")
    kv_rng = data.draw(ranges(case.K), label="kv ranges")
    check(mask, mask_and_dense(case.id)[1], q_rng, kv_rng, exact=case.exact)


@pytest.mark.parametrize("case", [c for c in CASES if c.exact], ids=[c.id for c in CASES if c.exact])
def test_bounds_exact_on_aligned_blocks(case):
    """What the block-sparse builder asks: tiles of a block size that is a multiple of the pattern's granularity."""
    mask = mask_and_dense(case.id)[0]
    for mult in (1, 2, 3, 8):
        blk = case.granularity * mult
        check(mask, mask_and_dense(case.id)[1], aligned(case.Q, blk), aligned(case.K, blk), exact=True)


def every_range(n: int) -> list[tuple[int, int]]:
    return [(lo, hi) for lo in range(n) for hi in range(lo, n)]


SMALL_EXACT = [c for c in CASES if c.exact and c.Q <= 33 and c.K <= 33]


@pytest.mark.parametrize("case", SMALL_EXACT, ids=[c.id for c in SMALL_EXACT])
def test_bounds_exact_on_every_rectangle_of_small_grids(case):
    """Exhaustive: every q-range x kv-range rectangle (33 x 33 grid: 561^2 of them) has exact bounds."""
    mask, dn = mask_and_dense(case.id)
    check(mask, dn, every_range(case.Q), every_range(case.K), exact=True)


@pytest.mark.parametrize("case", [c for c in CASES if c.id.startswith("radial")],
                         ids=[c.id for c in CASES if c.id.startswith("radial")])
def test_radial_bounds_exact_within_frames(case):
    """Rectangles inside one query frame and one key frame get exact radial bounds."""
    mask = mask_and_dense(case.id)[0]
    tpf = case.granularity
    for blk in [d for d in range(1, tpf + 1) if tpf % d == 0]:
        check(mask, mask_and_dense(case.id)[1], aligned(case.Q, blk), aligned(case.K, blk), exact=True)
    check(mask, mask_and_dense(case.id)[1], aligned(case.Q, tpf + 1), aligned(case.K, 2 * tpf), exact=False)


def test_neighborhood_bounds_skip_far_blocks():
    """Conservative 2-D bounds still rule out far-away tiles (the point of having them)."""
    mask = M.neighborhood((32, 32), (5, 5))
    tiles = aligned(1024, 64)
    any_, _ = bounds_of(mask, 1, 1, tiles, tiles)
    assert 0 < int(any_.sum()) <= 3 * 16  # a band of width 3 tiles at most


def test_bounds_at_scale_are_cheap_and_exact_on_diagonal():
    """128k x 128k in 128-token tiles: sliding-window bounds mark only the band, computed as one tensor op."""
    n, blk = 131072, 128
    lo = torch.arange(0, n, blk)
    q_lo, q_hi = lo.view(1, 1, -1, 1), (lo + blk - 1).view(1, 1, -1, 1)
    kv_lo, kv_hi = lo.view(1, 1, 1, -1), (lo + blk - 1).view(1, 1, 1, -1)
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.int64)
    any_, all_ = M.sliding_window(4096).block_bounds(zero, zero, q_lo, q_hi, kv_lo, kv_hi)
    nb = n // blk
    assert any_.shape == (1, 1, nb, nb)
    # tile diagonal t = q_tile - kv_tile: some element within the window for t in [0, 32], all for t in [1, 31]
    assert int(any_.sum()) == sum(nb - t for t in range(0, 33))
    assert int(all_.sum()) == sum(nb - t for t in range(1, 32))
