"""Radial attention for video: the spatial window shrinks as the temporal distance between frames grows.

Tokens are ``num_frames`` frames of ``tokens_per_frame`` tokens, frame-major: frame ``f = idx // tokens_per_frame``
and spatial index ``s = idx % tokens_per_frame``. With frame distance ``df = |f_q - f_kv|``:

* ``df <= 1``: dense (the same and the adjacent frames are fully visible);
* ``df`` in ``[2^(r-1), 2^r)`` for r >= 2 (df = 2..3, 4..7, ...): keep iff ``|s_q - s_kv| < max(min_window,
  tokens_per_frame >> r)``, so each doubling of the temporal distance halves the spatial window;
* plus every key in the first ``sink_frames`` frames (attention sinks), and False past ``num_frames`` frames.

(The df = 1 band of the ``[2^(r-1), 2^r)`` rule, r = 1, is overridden by the dense rule.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.masks._util import check_int, finish, fmt_name, tmax
from longattn.masks.core import MaskMod

__all__ = ["radial"]


def radial(num_frames: int, tokens_per_frame: int, *, min_window: int = 1, sink_frames: int = 0) -> MaskMod:
    """Radial attention (definition in the module docstring): O(n log n) spatio-temporal decay for video DiTs.

    Bounds are exact for rectangles inside one query frame and one key frame (the usual case when blocks are
    smaller than a frame); rectangles spanning several frames get conservative bounds.
    """
    nf = check_int("num_frames", num_frames, minimum=1)
    tpf = check_int("tokens_per_frame", tokens_per_frame, minimum=1)
    mw = check_int("min_window", min_window, minimum=1)
    sf = check_int("sink_frames", sink_frames, minimum=0, maximum=nf,
                   what=f"an int in [0, {nf}] (at most num_frames)")
    n, n_sink = nf * tpf, sf * tpf
    # (lowest df, window) per band r >= 2 whose df range [2^(r-1), 2^r) meets [2, nf - 1]
    bands = [(1 << (r - 1), max(mw, tpf >> r)) for r in range(2, max(nf - 1, 1).bit_length() + 1)]

    def window(df: Tensor) -> Tensor:
        """Spatial window for frame distance df >= 2 (a band edge test per band, tensor ops only)."""
        w = torch.zeros_like(df)
        for lo, win in bands:
            w = torch.where(df >= lo, win, w)
        return w

    def fn(b, h, q_idx, kv_idx):
        df = (q_idx // tpf - kv_idx // tpf).abs()
        keep = df <= 1
        if bands:
            keep = keep | ((q_idx % tpf - kv_idx % tpf).abs() < window(df))
        if n_sink:
            keep = keep | (kv_idx < n_sink)
        return keep & (q_idx < n) & (kv_idx < n)

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        qh, kh = q_hi.clamp(max=n - 1), kv_hi.clamp(max=n - 1)
        fql, fqh, fkl, fkh = q_lo // tpf, qh // tpf, kv_lo // tpf, kh // tpf
        df_min = tmax(tmax(fql - fkh, fkl - fqh), 0)
        df_max = tmax(fqh - fkl, fkh - fql)
        single = (fql == fqh) & (fkl == fkh)
        sql, sqh, skl, skh = q_lo % tpf, qh % tpf, kv_lo % tpf, kh % tpf
        ds_min = tmax(tmax(sql - skh, skl - sqh), 0)
        ds_max = tmax(sqh - skl, skh - sql)
        w = window(df_min) if bands else torch.zeros_like(df_min)
        sink_any = kv_lo < n_sink
        any_ = (q_lo < n) & (kv_lo < n) & (sink_any | (df_min <= 1) | ~single | (ds_min < w))
        all_ = ((q_hi < n) & (kv_hi < n)
                & ((kv_hi < n_sink) | (df_max <= 1) | (single & (ds_max < w))))
        return finish(any_, all_, q_lo, kv_lo)

    return MaskMod(fn, bounds=bounds, name=fmt_name("radial", nf, tpf, min_window=(mw, 1),
                                                    sink_frames=(sf, 0)))
