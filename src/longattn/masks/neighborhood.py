"""Neighborhood attention (NATTEN, Generalized Neighborhood Attention) over 1-, 2- or 3-D token grids.

Tokens of a grid ``(L,)``, ``(H, W)`` or ``(T, H, W)`` are flattened row-major. Per axis of length L with kernel
size k, dilation D and stride s:

* Dilation splits the axis into residue classes ``i % D``; a query sees only keys of its own class, and windows
  are counted in class coordinates ``c = i // D`` (class r holds ``L_r = ceil((L - r) / D)`` positions).
* Stride (GNA) groups queries ``c // s``; the group shares the window of its leader:
  non-causal, the group's centre ``min((c // s) * s + s // 2, L_r - 1)`` (the right-hand centre for even s);
  causal, the group's last query ``min((c // s) * s + s - 1, L_r - 1)``.
* Non-causal window: exactly k keys ``[start, start + k - 1]`` with ``start = clamp(leader - k // 2, 0, L_r - k)``,
  i.e. clamped at the borders as NATTEN does, so border queries still see k keys.
* Causal window: keys ``c'`` with ``leader - k < c' <= c``: never a future key, fewer keys near the start.
* A key is kept iff it is kept on every axis. As in NATTEN, ``k * D <= L`` and ``s <= k`` on every axis.

s = 1, D = 1 is plain neighborhood attention; s = k gives blocked (Swin-like window) attention.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longattn.masks._util import DeviceCache, check_bool, check_int, finish, per_axis, tmax, tmin
from longattn.masks.core import MaskMod

__all__ = ["neighborhood"]


def _axis_window(i: Tensor, L: int, k: int, dil: int, s: int, is_causal: bool):
    """Residue class and inclusive class-coordinate window ``[lo, hi]`` of query coordinate(s) ``i``."""
    if dil > 1:
        r, c = i % dil, i // dil
        n = (L - r + dil - 1) // dil
    else:
        r, c, n = None, i, L
    if is_causal:
        leader = c if s == 1 else tmin((c // s) * s + (s - 1), n - 1)
        return r, (leader - (k - 1)).clamp(min=0), c
    leader = c if s == 1 else tmin((c // s) * s + s // 2, n - 1)
    start = tmax(tmin(leader - k // 2, n - k), 0)
    return r, start, start + (k - 1)


def _coords(idx: Tensor, grid: tuple[int, ...]) -> list[Tensor]:
    out = []
    for size in reversed(grid[1:]):
        out.append(idx % size)
        idx = idx // size
    out.append(idx)
    return out[::-1]


def _as_grid(grid: object) -> tuple[int, ...]:
    if isinstance(grid, (tuple, list)):
        if not 1 <= len(grid) <= 3:
            raise ValueError(f"grid: expected 1 to 3 axis lengths, got {len(grid)} ({tuple(grid)!r})")
        return tuple(check_int(f"grid[{i}]", g, minimum=1) for i, g in enumerate(grid))
    return (check_int("grid", grid, minimum=1, what="a positive int or a tuple of 1 to 3 positive ints"),)


def neighborhood(grid: int | tuple[int, ...], kernel_size: int | tuple[int, ...], *,
                 dilation: int | tuple[int, ...] = 1, stride: int | tuple[int, ...] = 1,
                 causal: bool | tuple[bool, ...] = False) -> MaskMod:
    """Neighborhood attention over a row-major flattened grid (definition in the module docstring): sliding,
    dilated, strided (GNA) and per-axis causal windows for images and video; indices past the grid are False.

    Bounds are exact for 1-D grids with dilation 1; otherwise conservative (from each query's flattened
    neighbour span), which is sound but leaves more blocks to evaluate elementwise.
    """
    g = _as_grid(grid)
    nd = len(g)
    ks = per_axis("kernel_size", kernel_size, nd, lambda n, v: check_int(n, v, minimum=1))
    ds = per_axis("dilation", dilation, nd, lambda n, v: check_int(n, v, minimum=1))
    ss = per_axis("stride", stride, nd, lambda n, v: check_int(n, v, minimum=1))
    cs = per_axis("causal", causal, nd, check_bool)
    for a in range(nd):
        if ks[a] * ds[a] > g[a]:
            raise ValueError(f"kernel_size: expected kernel_size * dilation <= grid on every axis, got "
                             f"kernel_size={ks[a]} * dilation={ds[a]} > {g[a]} on axis {a}")
        if ss[a] > ks[a]:
            raise ValueError(f"stride: expected stride <= kernel_size on every axis, got stride={ss[a]} > "
                             f"kernel_size={ks[a]} on axis {a}")
    n = math.prod(g)
    axes = list(zip(g, ks, ds, ss, cs, strict=True))

    def fn(b, h, q_idx, kv_idx):
        keep = (q_idx < n) & (kv_idx < n)
        for qi, ki, (L, k, dil, s, c) in zip(_coords(q_idx, g), _coords(kv_idx, g), axes, strict=True):
            r, lo, hi = _axis_window(qi, L, k, dil, s, c)
            kc = ki // dil if dil > 1 else ki
            keep = keep & (kc >= lo) & (kc <= hi)
            if dil > 1:
                keep = keep & (ki % dil == r)
        return keep

    tables: list[DeviceCache] = []

    def build_tables() -> DeviceCache:
        """Per query token: suffix-min of the lowest neighbour, prefix-max of the highest, prefix-max of the
        lowest, suffix-min of the highest where the neighbour set is one contiguous flattened run (else -1)."""
        lo = torch.zeros(n, dtype=torch.int64)
        hi = torch.zeros(n, dtype=torch.int64)
        count = torch.ones(n, dtype=torch.int64)
        coords = _coords(torch.arange(n), g)
        step = 1
        for a in reversed(range(nd)):
            L, k, dil, s, c = axes[a]
            r, lo_c, hi_c = _axis_window(torch.arange(L), L, k, dil, s, c)
            r = 0 if r is None else r
            lo = lo + (lo_c * dil + r)[coords[a]] * step
            hi = hi + (hi_c * dil + r)[coords[a]] * step
            count = count * (hi_c - lo_c + 1)[coords[a]]
            step *= L
        contiguous = count == hi - lo + 1
        hi_contig = torch.where(contiguous, hi, torch.full_like(hi, -1))
        t = torch.stack([lo.flip(0).cummin(0).values.flip(0), hi.cummax(0).values,
                         lo.cummax(0).values, hi_contig.flip(0).cummin(0).values.flip(0)])
        return DeviceCache(t)

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        if not tables:
            tables.append(build_tables())
        t = tables[0].on(q_lo.device)
        qa, qb = q_lo.clamp(0, n - 1), q_hi.clamp(0, n - 1)
        any_ = (q_lo < n) & (kv_lo < n) & (t[0][qa] <= kv_hi) & (t[1][qb] >= kv_lo)
        all_ = (q_hi < n) & (kv_hi < n) & (t[2][qb] <= kv_lo) & (t[3][qa] >= kv_hi)
        return finish(any_, all_, q_lo, kv_lo)

    def show(vals: tuple) -> object:
        return vals[0] if len(set(vals)) == 1 else vals

    name = (f"neighborhood({g if nd > 1 else g[0]}, kernel_size={show(ks)}"
            + "".join(f", {key}={show(v)}" for key, v, d in (("dilation", ds, 1), ("stride", ss, 1),
                                                              ("causal", cs, False)) if v != (d,) * nd)
            + ")")
    return MaskMod(fn, bounds=bounds, name=name)
