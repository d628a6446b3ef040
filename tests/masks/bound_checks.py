"""Brute-force checks of rectangle bounds shared by the bounds and composition tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from mask_oracles import grids

from longattn import masks as M


def aligned(n: int, block: int) -> list[tuple[int, int]]:
    """Inclusive ranges of consecutive blocks of ``block`` tokens covering [0, n)."""
    return [(lo, min(lo + block, n) - 1) for lo in range(0, n, block)]


def brute(dense: torch.Tensor, q_rng: list[tuple[int, int]], kv_rng: list[tuple[int, int]]):
    """(any, all) of every q-range x kv-range rectangle, from exact True counts (2-D prefix sums): [B, H, nq, nkv]."""
    B, H, Q, K = dense.shape
    c = torch.zeros(B, H, Q + 1, K + 1, dtype=torch.int64)
    c[:, :, 1:, 1:] = dense.long().cumsum(2).cumsum(3)
    ql, qh = (torch.tensor([r[i] for r in q_rng]) for i in (0, 1))
    kl, kh = (torch.tensor([r[i] for r in kv_rng]) for i in (0, 1))

    def at(qi, ki):
        return c[:, :, qi.view(-1, 1), ki.view(1, -1)]

    count = at(qh + 1, kh + 1) - at(ql, kh + 1) - at(qh + 1, kl) + at(ql, kl)
    area = (qh - ql + 1).view(-1, 1) * (kh - kl + 1).view(1, -1)
    return count > 0, count == area


def bounds_of(mask: M.MaskMod, B: int, H: int, q_rng, kv_rng):
    """The mask's bounds on the rectangles, with b/h as broadcast grids and ranges as [1,1,nq,1] x [1,1,1,nkv]."""
    b, h, _, _ = grids(B, H, 1, 1)
    ql, qh = (torch.tensor([r[i] for r in q_rng]).view(1, 1, -1, 1) for i in (0, 1))
    kl, kh = (torch.tensor([r[i] for r in kv_rng]).view(1, 1, 1, -1) for i in (0, 1))
    any_, all_ = mask.block_bounds(b, h, ql, qh, kl, kh)
    assert any_.dtype == torch.bool and all_.dtype == torch.bool
    shape = (B, H, len(q_rng), len(kv_rng))
    return any_.expand(shape), all_.expand(shape)


def ranges(n: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    pair = st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).map(lambda t: (min(t), max(t)))
    return st.lists(pair, min_size=1, max_size=8)


def check(mask: M.MaskMod, dense: torch.Tensor, q_rng, kv_rng, *, exact: bool) -> None:
    """Bounds vs brute force on every q-range x kv-range rectangle: sound always, equal when ``exact``."""
    b_any, b_all = brute(dense, q_rng, kv_rng)
    any_, all_ = bounds_of(mask, dense.shape[0], dense.shape[1], q_rng, kv_rng)
    where = f"{mask.name} q={q_rng} kv={kv_rng}"
    assert bool((any_ | ~b_any).all()), f"any bound misses a True element: {where}"
    assert bool((~all_ | b_all).all()), f"all bound claims a rectangle that has a False element: {where}"
    if exact:
        assert torch.equal(any_, b_any), f"any bound not exact: {where}"
        assert torch.equal(all_, b_all), f"all bound not exact: {where}"
