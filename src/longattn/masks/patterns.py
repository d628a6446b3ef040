"""1-D token patterns as mask_mod factories, each with exact (or sound) rectangle bounds.

Shared conventions:

* ``q_pos = q_idx + offset`` for factories taking ``offset`` (bottom-right alignment when seq_q != seq_kv:
  ``offset = seq_kv - seq_q``); the distance is ``d = q_pos - kv_idx``.
* Unit patterns (``dilated``, ``strided``, ``power``) group tokens into units ``u = pos // granularity``;
  ``du = q_pos // granularity - kv_idx // granularity``. granularity = kernel block size keeps them block-aligned.
* Mask functions use tensor ops only, so they run on broadcast index grids and under ``torch.vmap``
  (FlexAttention's ``create_mask`` / ``create_block_mask``); captured tensors follow the index tensors' device.
* ``bounds`` are exact for every rectangle unless a factory says otherwise (then they are conservative).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from longattn.masks._util import (
    DeviceCache,
    check_bool,
    check_int,
    finish,
    fmt_name,
    has_multiple,
    highest_pow2,
    int_vector,
    range_bounds,
    same_unit_causal_any,
    tmax,
    tmin,
)
from longattn.masks.core import MaskMod

__all__ = [
    "bigbird", "block_local", "causal", "dilated", "document", "document_ids", "full", "global_tokens",
    "longlora_shifted", "per_head_window", "power", "random_blocks", "sinks", "sliding_window", "strided",
]


def _grid_ones(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return torch.ones((), dtype=torch.bool, device=q_idx.device).expand(torch.broadcast_shapes(q_idx.shape,
                                                                                               kv_idx.shape))


# --------------------------------------------------------------------------------------------- basic
def full() -> MaskMod:
    """Every query sees every key: the dense baseline, useful as an identity for composition."""

    def fn(b, h, q_idx, kv_idx):
        return _grid_ones(q_idx, kv_idx)

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        t = torch.ones((), dtype=torch.bool, device=q_lo.device)
        return finish(t, t, q_lo, kv_lo)

    return MaskMod(fn, bounds=bounds, name="full()")


def causal(*, offset: int = 0) -> MaskMod:
    """Causal mask ``kv_idx <= q_idx + offset``: autoregressive decoding, bottom-right aligned via offset."""
    off = check_int("offset", offset)

    def fn(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + off

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        return finish(q_hi + off >= kv_lo, q_lo + off >= kv_hi, q_lo, kv_lo)

    return MaskMod(fn, bounds=bounds, name=fmt_name("causal", offset=(off, 0)))


def _window_bounds(q_lo, q_hi, kv_lo, kv_hi, off, window, is_causal):
    dmin, dmax = q_lo + off - kv_hi, q_hi + off - kv_lo
    return range_bounds(dmin, dmax, 0 if is_causal else 1 - window, window - 1)


def sliding_window(window: int = 4096, *, causal: bool = True, offset: int = 0) -> MaskMod:
    """Local attention: causal ``0 <= d < window`` (the window most recent keys incl. the diagonal), else ``|d| <
    window``; the Mistral / Longformer local pattern (default: Mistral 7B's 4096-token window)."""
    w = check_int("window", window, minimum=1)
    is_causal, off = check_bool("causal", causal), check_int("offset", offset)

    def fn(b, h, q_idx, kv_idx):
        d = q_idx + off - kv_idx
        return ((d >= 0) & (d < w)) if is_causal else (d.abs() < w)

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        return finish(*_window_bounds(q_lo, q_hi, kv_lo, kv_hi, off, w, is_causal), q_lo, kv_lo)

    return MaskMod(fn, bounds=bounds, name=fmt_name("sliding_window", w, causal=(is_causal, True), offset=(off, 0)))


def sinks(num_sinks: int = 4, window: int = 1020, *, offset: int = 0) -> MaskMod:
    """StreamingLLM / LM-Infinite Λ-shape: causal and (``kv_idx < num_sinks`` or ``d < window``), so the first
    tokens stay visible as attention sinks beside a sliding window (default: StreamingLLM's 4 sinks in a
    1024-token cache)."""
    ns = check_int("num_sinks", num_sinks, minimum=0)
    w = check_int("window", window, minimum=1)
    off = check_int("offset", offset)

    def fn(b, h, q_idx, kv_idx):
        d = q_idx + off - kv_idx
        return (d >= 0) & ((kv_idx < ns) | (d < w))

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        pl, ph = q_lo + off, q_hi + off
        win_any, _ = _window_bounds(q_lo, q_hi, kv_lo, kv_hi, off, w, True)
        any_ = win_any | ((kv_lo < ns) & (kv_lo <= ph))
        # every key >= num_sinks must be within the window of every query (and everything causal)
        all_ = (pl >= kv_hi) & ((kv_hi < ns) | (ph - tmax(kv_lo, ns) < w))
        return finish(any_, all_, q_lo, kv_lo)

    return MaskMod(fn, bounds=bounds, name=fmt_name("sinks", ns, w, offset=(off, 0)))


# --------------------------------------------------------------------------------------------- unit patterns
def dilated(window: int, dilation: int, *, granularity: int = 1, causal: bool = True, offset: int = 0) -> MaskMod:
    """Dilated window over units (LongNet-style with granularity = block size): ``du % dilation == 0`` and
    ``0 <= du < window*dilation`` (causal, plus token causality ``kv_idx <= q_pos``) or ``|du| < window*dilation``."""
    w = check_int("window", window, minimum=1)
    dil = check_int("dilation", dilation, minimum=1)
    g = check_int("granularity", granularity, minimum=1)
    is_causal, off = check_bool("causal", causal), check_int("offset", offset)
    top = (w - 1) * dil  # largest kept |du|

    def fn(b, h, q_idx, kv_idx):
        qp = q_idx + off
        du = qp // g - kv_idx // g
        keep = ((kv_idx <= qp) & (du <= top)) if is_causal else (du.abs() <= top)
        return keep & (du % dil == 0) if dil > 1 else keep

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        pl, ph = q_lo + off, q_hi + off
        dmin, dmax = pl // g - kv_hi // g, ph // g - kv_lo // g  # every du in between occurs
        lo = 0 if is_causal else -top
        every = (dmin >= lo) & (dmax <= top) & (dmin % dil == 0)
        if dil > 1:
            every = every & (dmin == dmax)
        if is_causal:
            # du > 0 implies token causality; du == 0 needs a same-unit pair with kv <= q_pos
            any_ = has_multiple(tmax(dmin, 1), tmin(dmax, top), dil) | same_unit_causal_any(pl, ph, kv_lo, kv_hi, g)
            all_ = every & (pl >= kv_hi)
        else:
            any_, all_ = has_multiple(tmax(dmin, lo), tmin(dmax, top), dil), every
        return finish(any_, all_, q_lo, kv_lo)

    name = fmt_name("dilated", w, dil, granularity=(g, 1), causal=(is_causal, True), offset=(off, 0))
    return MaskMod(fn, bounds=bounds, name=name)


def strided(stride: int, *, local_window: int = 0, granularity: int = 1, causal: bool = True,
            offset: int = 0) -> MaskMod:
    """S2-Attention shards: head h sees kv units with ``(kv_idx // granularity) % stride == h % stride`` plus the
    ``local_window`` most recent tokens (``|d| < local_window`` non-causal); ``stride`` consecutive heads together
    cover the whole (causal) context."""
    s = check_int("stride", stride, minimum=1)
    lw = check_int("local_window", local_window, minimum=0)
    g = check_int("granularity", granularity, minimum=1)
    is_causal, off = check_bool("causal", causal), check_int("offset", offset)

    def fn(b, h, q_idx, kv_idx):
        d = q_idx + off - kv_idx
        shard = (kv_idx // g) % s == h % s
        if is_causal:
            return (d >= 0) & ((shard | (d < lw)) if lw else shard)
        return (shard | (d.abs() < lw)) if lw else shard

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        pl, ph = q_lo + off, q_hi + off
        r = h % s
        k_top = tmin(kv_hi, ph) if is_causal else kv_hi  # keys a shard hit may use
        u0, u1 = kv_lo // g, k_top // g
        shard_any = (kv_lo <= k_top) & (u0 + (r - u0) % s <= u1)
        local_any, _ = _window_bounds(q_lo, q_hi, kv_lo, kv_hi, off, lw, is_causal)
        any_ = shard_any | local_any
        # all: every key outside the head's shard must be in the local window of every query
        if s == 1:
            off_shard = torch.zeros((), dtype=torch.bool, device=q_lo.device)
            kmin = kmax = kv_lo
        else:
            u_hi = kv_hi // g
            kmin = torch.where(u0 % s != r, kv_lo, (u0 + 1) * g)  # smallest off-shard key in range
            kmax = torch.where(u_hi % s != r, kv_hi, u_hi * g - 1)  # largest off-shard key in range
            off_shard = kmin <= kv_hi
        local_ok = (ph - kmin < lw) & ((kmax - pl < lw) | is_causal)
        all_ = ~off_shard | local_ok
        if is_causal:
            all_ = all_ & (pl >= kv_hi)
        return finish(any_, all_, q_lo, kv_lo)

    name = fmt_name("strided", s, local_window=(lw, 0), granularity=(g, 1), causal=(is_causal, True),
                    offset=(off, 0))
    return MaskMod(fn, bounds=bounds, name=name)


def power(*, granularity: int = 1, local: int = 1, causal: bool = True, offset: int = 0) -> MaskMod:
    """PowerAttention: unit distance du kept if ``du < local`` or du is 0 or a power of two (``du & (du-1) == 0``),
    giving log-depth receptive fields; causal adds token causality, non-causal uses |du|."""
    g = check_int("granularity", granularity, minimum=1)
    loc = check_int("local", local, minimum=0)
    is_causal, off = check_bool("causal", causal), check_int("offset", offset)
    # [0, end] is the longest kept prefix of distances; beyond it only isolated powers of two are kept
    end = max(loc - 1, 2)
    end += 1 if (end + 1) & end == 0 else 0

    def kept(a: Tensor) -> Tensor:
        return (a < loc) | ((a & (a - 1)) == 0)

    def fn(b, h, q_idx, kv_idx):
        qp = q_idx + off
        du = qp // g - kv_idx // g
        return ((kv_idx <= qp) & kept(du)) if is_causal else kept(du.abs())

    def any_kept(lo: Tensor, hi: Tensor) -> Tensor:  # some kept distance in [lo, hi], lo >= 0
        return (lo <= hi) & ((lo <= end) | (highest_pow2(hi) >= lo))

    def all_kept(lo: Tensor, hi: Tensor) -> Tensor:  # every distance in [lo, hi] kept, 0 <= lo <= hi
        return (hi <= end) | ((lo == hi) & kept(lo))

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        pl, ph = q_lo + off, q_hi + off
        dmin, dmax = pl // g - kv_hi // g, ph // g - kv_lo // g
        if is_causal:
            any_ = any_kept(dmin.clamp(min=1), dmax) | same_unit_causal_any(pl, ph, kv_lo, kv_hi, g)
            all_ = (pl >= kv_hi) & all_kept(dmin.clamp(min=0), dmax)
        else:
            amin = torch.where(dmin > 0, dmin, torch.where(dmax < 0, -dmax, torch.zeros_like(dmin)))
            amax = torch.maximum(dmin.abs(), dmax.abs())
            any_, all_ = any_kept(amin, amax), all_kept(amin, amax)
        return finish(any_, all_, q_lo, kv_lo)

    name = fmt_name("power", granularity=(g, 1), local=(loc, 1), causal=(is_causal, True), offset=(off, 0))
    return MaskMod(fn, bounds=bounds, name=name)


# --------------------------------------------------------------------------------------------- blocks and groups
def _same_block_bounds(pl, ph, kl, kh, block, is_causal):
    any_ = tmax(pl // block, kl // block) <= tmin(ph // block, kh // block)
    all_ = (pl // block == ph // block) & (kl // block == kh // block) & (pl // block == kl // block)
    if is_causal:
        any_, all_ = any_ & (kl <= ph), all_ & (pl >= kh)
    return any_, all_


def block_local(block: int, *, causal: bool = True, offset: int = 0) -> MaskMod:
    """Block-diagonal attention ``q_pos // block == kv_idx // block`` (causal inside if causal): chunked local
    attention as in Llama-4's chunked layers."""
    blk = check_int("block", block, minimum=1)
    is_causal, off = check_bool("causal", causal), check_int("offset", offset)

    def fn(b, h, q_idx, kv_idx):
        qp = q_idx + off
        same = qp // blk == kv_idx // blk
        return same & (kv_idx <= qp) if is_causal else same

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        return finish(*_same_block_bounds(q_lo + off, q_hi + off, kv_lo, kv_hi, blk, is_causal), q_lo, kv_lo)

    return MaskMod(fn, bounds=bounds, name=fmt_name("block_local", blk, causal=(is_causal, True), offset=(off, 0)))


def global_tokens(num_global: int, *, offset: int = 0) -> MaskMod:
    """Longformer / BigBird global tokens, both directions: ``kv_idx < num_global`` or ``q_pos < num_global``."""
    n = check_int("num_global", num_global, minimum=0)
    off = check_int("offset", offset)

    def fn(b, h, q_idx, kv_idx):
        return (kv_idx < n) | (q_idx + off < n)

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        return finish((kv_lo < n) | (q_lo + off < n), (kv_hi < n) | (q_hi + off < n), q_lo, kv_lo)

    return MaskMod(fn, bounds=bounds, name=fmt_name("global_tokens", n, offset=(off, 0)))


def longlora_shifted(group: int, num_heads: int, *, causal: bool = True) -> MaskMod:
    """LongLoRA S2-Attn as a mask: heads ``h < num_heads // 2`` attend within groups ``q // group == kv // group``,
    the others within groups shifted by ``group // 2`` (``(q + group//2) // group == (kv + group//2) // group``).

    This is the mask form without LongLoRA's wrap-around roll: the shifted half's first and last partial groups
    stay separate instead of the tail tokens being rolled in front of the head tokens. Causal inside if causal.
    """
    grp = check_int("group", group, minimum=1)
    nh = check_int("num_heads", num_heads, minimum=1)
    is_causal = check_bool("causal", causal)
    half, shift = nh // 2, grp // 2

    def fn(b, h, q_idx, kv_idx):
        sh = (h >= half) * shift
        same = (q_idx + sh) // grp == (kv_idx + sh) // grp
        return same & (kv_idx <= q_idx) if is_causal else same

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        sh = (h >= half) * shift
        return finish(*_same_block_bounds(q_lo + sh, q_hi + sh, kv_lo + sh, kv_hi + sh, grp, is_causal),
                      q_lo, kv_lo)

    return MaskMod(fn, bounds=bounds, name=fmt_name("longlora_shifted", grp, nh, causal=(is_causal, True)))


def _block_band(block: int, half: int) -> MaskMod:
    """Block-level band ``|q // block - kv // block| <= half`` (BigBird's sliding blocks)."""

    def fn(b, h, q_idx, kv_idx):
        return (q_idx // block - kv_idx // block).abs() <= half

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        dmin, dmax = q_lo // block - kv_hi // block, q_hi // block - kv_lo // block
        return finish(*range_bounds(dmin, dmax, -half, half), q_lo, kv_lo)

    return MaskMod(fn, bounds=bounds, name=f"block_band({block}, {half})")


def _in_range(seq_q: int, seq_kv: int) -> MaskMod:
    """``q_idx < seq_q and kv_idx < seq_kv``: confines a length-aware pattern to its declared lengths."""

    def fn(b, h, q_idx, kv_idx):
        return (q_idx < seq_q) & (kv_idx < seq_kv)

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        return finish((q_lo < seq_q) & (kv_lo < seq_kv), (q_hi < seq_q) & (kv_hi < seq_kv), q_lo, kv_lo)

    return MaskMod(fn, bounds=bounds, name=f"in_range({seq_q}, {seq_kv})")


_MAX_BLOCK_SPAN = 16  # random-block bounds check at most this many query blocks per rectangle exactly


def random_blocks(seq_q: int, seq_kv: int, block: int, num_random: int, *, seed: int = 0,
                  num_heads: int | None = None) -> MaskMod:
    """BigBird random attention: query block i attends ``num_random`` distinct kv blocks drawn from
    ``torch.Generator().manual_seed(seed)`` (one table per head if ``num_heads`` is given, else shared).

    The table is captured as an int64 tensor ``[num_heads or 1, ceil(seq_q/block), num_random]`` (attribute
    ``table`` of the returned mask); indices beyond seq_q / seq_kv are False. Bounds are exact for rectangles
    spanning up to 16 query blocks, conservative beyond.
    """
    sq = check_int("seq_q", seq_q, minimum=1)
    skv = check_int("seq_kv", seq_kv, minimum=1)
    blk = check_int("block", block, minimum=1)
    n_qb, n_kb = -(-sq // blk), -(-skv // blk)
    nr = check_int("num_random", num_random, minimum=1, maximum=n_kb,
                   what=f"an int in [1, {n_kb}] (the number of kv blocks)")
    sd = check_int("seed", seed)
    nh = None if num_heads is None else check_int("num_heads", num_heads, minimum=1)
    gen = torch.Generator().manual_seed(sd)
    table = torch.stack([torch.rand(n_qb, n_kb, generator=gen).topk(nr, dim=-1).indices
                         for _ in range(nh or 1)]).to(torch.int64)
    cache, flat = DeviceCache(table), DeviceCache(table.flatten())

    def fn(b, h, q_idx, kv_idx):
        tab = flat.on(q_idx.device)  # one flat index tensor per lookup: works under vmap and torch.compile
        row = (q_idx // blk).clamp(max=n_qb - 1) * nr
        if nh is not None:
            row = row + h * (n_qb * nr)
        kb = kv_idx // blk
        keep = tab[row] == kb
        for r in range(1, nr):
            keep = keep | (tab[row + r] == kb)
        return keep & (q_idx < sq) & (kv_idx < skv)

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        tab = cache.on(q_lo.device)
        hh = h if nh is not None else torch.zeros((), dtype=torch.int64, device=q_lo.device)
        qb_lo, qb_hi = q_lo // blk, tmin(q_hi, sq - 1) // blk
        kb_lo, kb_hi = kv_lo // blk, tmin(kv_hi, skv - 1) // blk
        span = int((qb_hi - qb_lo).max().clamp(min=0)) + 1 if qb_hi.numel() else 1
        any_ = torch.zeros((), dtype=torch.bool, device=q_lo.device)
        all_ = torch.ones((), dtype=torch.bool, device=q_lo.device)
        for j in range(min(span, _MAX_BLOCK_SPAN)):
            qb = qb_lo + j
            valid = qb <= qb_hi
            rows = tab[hh, qb.clamp(max=n_qb - 1)]  # [..., num_random]
            hits = ((rows >= kb_lo.unsqueeze(-1)) & (rows <= kb_hi.unsqueeze(-1))).sum(-1)
            any_ = any_ | (valid & (hits > 0))
            all_ = all_ & (~valid | (hits == kb_hi - kb_lo + 1))
        wide = qb_hi - qb_lo >= _MAX_BLOCK_SPAN
        in_any = (q_lo < sq) & (kv_lo < skv)
        any_ = in_any & (any_ | wide)
        all_ = all_ & ~wide & (q_hi < sq) & (kv_hi < skv)
        return finish(any_, all_, q_lo, kv_lo)

    name = fmt_name("random_blocks", sq, skv, blk, nr, seed=(sd, 0), num_heads=(nh, None))
    mask = MaskMod(fn, bounds=bounds, name=name)
    mask.table = table  # type: ignore[attr-defined]
    return mask


def bigbird(seq_q: int, seq_kv: int, block: int, *, num_global_blocks: int = 1, window_blocks: int = 3,
            num_random: int = 2, seed: int = 0, num_heads: int | None = None) -> MaskMod:
    """BigBird (ITC form): global tokens (``num_global_blocks * block``, both directions) | block window
    ``|qb - kb| <= window_blocks // 2`` | ``num_random`` random kv blocks per query block; False beyond the lengths.

    Random blocks may coincide with window or global blocks (they are drawn from all kv blocks); ``num_random=0``
    drops the random part. Bounds: exact for global and window parts, union bounds otherwise.
    """
    sq = check_int("seq_q", seq_q, minimum=1)
    skv = check_int("seq_kv", seq_kv, minimum=1)
    blk = check_int("block", block, minimum=1)
    ng = check_int("num_global_blocks", num_global_blocks, minimum=0)
    wb = check_int("window_blocks", window_blocks, minimum=1)
    nr = check_int("num_random", num_random, minimum=0)
    mask = global_tokens(ng * blk) | _block_band(blk, wb // 2)
    if nr:
        mask = mask | random_blocks(sq, skv, blk, nr, seed=seed, num_heads=num_heads)
    else:
        check_int("seed", seed)
        if num_heads is not None:
            check_int("num_heads", num_heads, minimum=1)
    mask = mask & _in_range(sq, skv)
    name = fmt_name("bigbird", sq, skv, blk, num_global_blocks=(ng, 1), window_blocks=(wb, 3),
                    num_random=(nr, 2), seed=(seed, 0), num_heads=(num_heads, None))
    return MaskMod(mask.fn, bounds=mask.bounds, name=name)


# --------------------------------------------------------------------------------------------- documents, heads
def _canonical_ids(q_ids: Tensor, kv_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Relabel sorted ids so that shared ids become 4*j (j-th shared document, in order) and ids present on only
    one side become 4*j-3 (queries) / 4*j-1 (keys): order is kept, equality means "same shared document", and a
    rectangle's any/all reduce to interval arithmetic on its corner ids. A one-sided sentinel id ends each."""
    u = torch.unique(torch.cat([q_ids, kv_ids]))
    live = torch.isin(u, q_ids) & torch.isin(u, kv_ids)
    rank = torch.cumsum(live.to(torch.int64), 0)  # shared ids <= u

    def relabel(ids: Tensor, dead: int) -> Tensor:
        i = torch.searchsorted(u, ids)
        out = torch.where(live[i], 4 * (rank[i] - 1), 4 * rank[i] - dead)
        sentinel = 4 * (int(rank[-1]) if rank.numel() else 0) - dead  # a one-sided id after the last document
        return torch.cat([out, out.new_tensor([sentinel])])

    return relabel(q_ids, 3), relabel(kv_ids, 1)


def _ids_mask(q_ids: Tensor, kv_ids: Tensor, name: str) -> MaskMod:
    sorted_ids = bool((q_ids[1:] >= q_ids[:-1]).all()) and bool((kv_ids[1:] >= kv_ids[:-1]).all())
    nq, nk = q_ids.numel(), kv_ids.numel()
    if sorted_ids:
        qc, kc = _canonical_ids(q_ids, kv_ids)
    else:  # arbitrary ids: plain equality with never-equal sentinels, no bounds
        lo = int(torch.minimum(q_ids.min(), kv_ids.min())) if nq and nk else 0
        qc = torch.cat([q_ids, q_ids.new_tensor([lo - 1])])
        kc = torch.cat([kv_ids, kv_ids.new_tensor([lo - 2])])
    q_cache, kv_cache = DeviceCache(qc), DeviceCache(kc)

    def fn(b, h, q_idx, kv_idx):
        return q_cache.on(q_idx.device)[q_idx.clamp(max=nq)] == kv_cache.on(kv_idx.device)[kv_idx.clamp(max=nk)]

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        qt, kt = q_cache.on(q_lo.device), kv_cache.on(kv_lo.device)
        qa, qb = qt[q_lo.clamp(max=nq)], qt[q_hi.clamp(max=nq)]
        ka, kb = kt[kv_lo.clamp(max=nk)], kt[kv_hi.clamp(max=nk)]
        any_ = has_multiple(torch.maximum(qa, ka), torch.minimum(qb, kb), 4)  # a shared id in both ranges
        all_ = (qa == qb) & (ka == kb) & (qa == ka) & (qa % 4 == 0)
        return finish(any_, all_, q_lo, kv_lo)

    return MaskMod(fn, bounds=bounds if sorted_ids else None, name=name)


def document(seq_lens: Sequence[int] | Tensor, *, kv_seq_lens: Sequence[int] | Tensor | None = None) -> MaskMod:
    """Packed variable-length sequences: a query sees keys of the same document (compose with ``causal()``).

    Document i spans ``seq_lens[i]`` queries and ``kv_seq_lens[i]`` keys (default: the same lengths); indices
    past the total length are False. Zero lengths are allowed. Bounds are exact for every rectangle.
    """
    q_lens = int_vector("seq_lens", seq_lens, minimum=0)
    if kv_seq_lens is None:
        kv_lens = q_lens
    else:
        kv_lens = int_vector("kv_seq_lens", kv_seq_lens, minimum=0)
        if kv_lens.numel() != q_lens.numel():
            raise ValueError(f"kv_seq_lens: expected {q_lens.numel()} lengths (one per document in seq_lens), "
                             f"got {kv_lens.numel()}")
    docs = torch.arange(q_lens.numel())
    q_ids = torch.repeat_interleave(docs, q_lens)
    kv_ids = torch.repeat_interleave(docs, kv_lens)
    nq, nk = int(q_lens.sum()), int(kv_lens.sum())
    detail = f"{q_lens.numel()} docs, {nq} tokens" + ("" if kv_seq_lens is None else f", {nk} kv tokens")
    return _ids_mask(q_ids, kv_ids, f"document({detail})")


def document_ids(q_ids: Sequence[int] | Tensor, kv_ids: Sequence[int] | Tensor | None = None) -> MaskMod:
    """Same-document mask from per-token ids ``q_ids[q_idx] == kv_ids[kv_idx]`` (kv_ids defaults to q_ids).

    Indices past the id vectors are False. Exact bounds when both id vectors are non-decreasing (packed
    documents); otherwise no bounds (every block is evaluated elementwise).
    """
    qi = int_vector("q_ids", q_ids)
    ki = qi if kv_ids is None else int_vector("kv_ids", kv_ids)
    extra = "" if kv_ids is None else f", {ki.numel()} kv tokens"
    return _ids_mask(qi, ki, f"document_ids({qi.numel()} tokens{extra})")


def per_head_window(windows: Sequence[int] | Tensor, *, causal: bool = True, offset: int = 0) -> MaskMod:
    """MoA heterogeneous sliding windows: head h uses ``windows[h]`` with ``sliding_window`` semantics
    (h must be < len(windows))."""
    win = int_vector("windows", windows, minimum=1)
    is_causal, off = check_bool("causal", causal), check_int("offset", offset)
    cache = DeviceCache(win)

    def fn(b, h, q_idx, kv_idx):
        w = cache.on(q_idx.device)[h]
        d = q_idx + off - kv_idx
        return ((d >= 0) & (d < w)) if is_causal else (d.abs() < w)

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        w = cache.on(q_lo.device)[h]
        return finish(*_window_bounds(q_lo, q_hi, kv_lo, kv_hi, off, w, is_causal), q_lo, kv_lo)

    shown = win.tolist() if win.numel() <= 8 else f"{win.numel()} heads"
    name = fmt_name("per_head_window", shown, causal=(is_causal, True), offset=(off, 0))
    return MaskMod(fn, bounds=bounds, name=name)

