"""Block-gather attention: the CPU execution path for sparse masks, in plain vectorised PyTorch.

For a few query blocks at a time it gathers only the kv blocks their lists name, so the work is proportional to
the retained blocks (unlike the reference, which scores every pair and masks); gathered columns are appended by
index. Without LSE the gathered blocks go
through PyTorch's fused SDPA kernel (one pass, no score tensor kept); with LSE, through the explicit softmax the
reference uses. When the blocks cover much of each row's key prefix (token-level patterns with many partial
blocks), per-block gathering costs more than it saves; then, without LSE, query chunks run through fused SDPA over
their whole key prefix with the BlockSparse expanded to an element mask (same pairs, same result). Differentiable
through autograd.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from longattn.kernels.reference import softmax_attend
from longattn.masks.block_sparse import BlockSparse, unpack_bits

_CHUNK_ELEMS = 1 << 23  # score elements (q rows × gathered keys × heads) held at once
_PREFIX_SHARE = 0.6  # kept blocks / key-prefix blocks above which the masked-prefix strategy is used (CPU: a
# 1024-window at 4k, share 0.46, runs 190 ms per layer by blocks vs 317 ms by masked prefix; dense 151 ms)
_PREFIX_ROWS = 1024  # query rows per masked-prefix SDPA call


def block_gather_attention(q: Tensor, k: Tensor, v: Tensor, bs: BlockSparse, scale: float,
                           compute_dtype: torch.dtype | None = None, *, return_lse: bool = True
                           ) -> tuple[Tensor, Tensor | None]:
    """(out [B, Hq, Sq, D] in q.dtype, lse [B, Hq, Sq] or None; -inf / 0 where nothing is attended). With LSE it
    computes in float32 for half inputs (float64 stays float64), like the reference; without, in SDPA's own
    precision (float32 accumulation)."""
    if bs.varlen:
        raise ValueError("mask: the gather path takes plain (not packed variable-length) BlockSparse masks")
    if compute_dtype is None:
        compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    if not return_lse and prefix_share(bs) > _PREFIX_SHARE:
        return masked_prefix_attention(q, k, v, bs, scale), None
    outs, lses = [], []
    for qc, kg, vg, allowed, rows in _gathered(q, k, v, bs, compute_dtype if return_lse else q.dtype):
        if return_lse:
            s = (qc @ kg.transpose(-1, -2)) * scale
            o, lse = softmax_attend(s, vg, allowed)
            lses.append(lse.flatten(2)[:, :, :rows])
        else:
            o = F.scaled_dot_product_attention(qc.flatten(0, 2).unsqueeze(1), kg.flatten(0, 2).unsqueeze(1),
                                               vg.flatten(0, 2).unsqueeze(1),
                                               attn_mask=allowed.flatten(0, 2).unsqueeze(1), scale=scale)
            o = torch.where(allowed.any(-1, keepdim=True), o.view(qc.shape), 0)  # empty rows: 0, not NaN
        outs.append(o.flatten(2, 3)[:, :, :rows])
    out = torch.cat(outs, 2).to(q.dtype)
    return out, (torch.cat(lses, 2) if return_lse else None)


def _gathered(q: Tensor, k: Tensor, v: Tensor, bs: BlockSparse, dtype: torch.dtype
              ) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor, int]]:
    """Per chunk of query blocks: q [B, Hq, n, bq, D], the kv tokens their lists name [B, Hq, n, E·bkv, D] (GQA by
    index, no copies of K/V per head), the allowed mask [B, Hq, n, bq, E·bkv], and the chunk's valid rows."""
    B, Hq, Sq, D = q.shape
    group = Hq // k.shape[1]
    bq, bkv = bs.block_size
    kx, vx = _wide_for_grad(k, dtype), _wide_for_grad(v, dtype)
    tiles = torch.cat([torch.ones(1, bq, bkv, dtype=torch.bool, device=q.device), unpack_bits(bs.tiles, bkv)])
    shape = (B, Hq, len(bs.q_blocks))
    idx = bs.kv_indices.expand(*shape, -1).long()
    counts = bs.kv_counts.expand(shape)
    tile_ids = bs.tile_ids.expand(*shape, -1).long() + 1  # 0 = full block
    width = max(1, int(counts.max()))
    per_chunk = max(1, _CHUNK_ELEMS // (B * Hq * bq * width * bkv))
    b_ix = torch.arange(B, device=q.device).view(B, 1, 1)
    h_ix = (torch.arange(Hq, device=q.device) // group).view(1, Hq, 1)
    cols = torch.arange(bkv, device=q.device)
    for lo in range(0, len(bs.q_blocks), per_chunk):
        hi = min(len(bs.q_blocks), lo + per_chunk)
        n = hi - lo
        used = max(1, int(counts[..., lo:hi].max()))  # rows with no entries are masked below
        ent = idx[..., lo:hi, :used]  # [B, Hq, n, E]
        tok = (ent.unsqueeze(-1) * bkv + cols).flatten(-2)  # [B, Hq, n, E * bkv]
        in_list = (torch.arange(used, device=q.device) < counts[..., lo:hi, None]).repeat_interleave(bkv, -1)
        allowed = in_list & (tok < k.shape[2])
        tok = tok.clamp(max=k.shape[2] - 1).view(B, Hq, -1)
        kg = kx[b_ix, h_ix, tok].view(B, Hq, n, used * bkv, D).to(dtype)
        vg = vx[b_ix, h_ix, tok].view(B, Hq, n, used * bkv, D).to(dtype)
        bits = tiles[tile_ids[..., lo:hi, :used]]  # [B, Hq, n, E, bq, bkv]
        bits = bits.permute(0, 1, 2, 4, 3, 5).reshape(B, Hq, n, bq, used * bkv)
        allowed = allowed.view(B, Hq, n, 1, -1) & bits
        q_lo, q_hi = lo * bq, min(Sq, hi * bq)
        if bs.columns is not None:  # gathered columns: appended after the blocks' keys, causal, outside kept blocks
            kc, vc, ac = _column_keys(kx, vx, bs, lo, hi, (B, Hq), b_ix, h_ix)
            kg, vg = torch.cat([kg, kc.to(dtype)], 3), torch.cat([vg, vc.to(dtype)], 3)
            allowed = torch.cat([allowed, ac], 4)
        qc = F.pad(q[:, :, q_lo:q_hi].to(dtype), (0, 0, 0, n * bq - (q_hi - q_lo))).view(B, Hq, n, bq, D)
        yield qc, kg, vg, allowed, q_hi - q_lo


def _wide_for_grad(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, or in float32 when a half-precision ``t`` needs a gradient: its gathered or GQA-expanded
    copies are cast down after the copy, so their gradients (one per query head and block) are summed in float32
    rather than rounded to half precision per head (that doubled the dK/dV error at GQA 4:1)."""
    half = dtype in (torch.float16, torch.bfloat16)
    return t.float() if half and t.requires_grad and torch.is_grad_enabled() else t.to(dtype)


def prefix_share(bs: BlockSparse) -> float:
    """Kept kv blocks / the blocks of each query block's key prefix (up to its last kept block), over all rows."""
    counts = bs.kv_counts.long()
    pos = torch.arange(bs.kv_indices.shape[-1], device=counts.device)
    live = pos < counts.unsqueeze(-1)
    last = torch.where(live, bs.kv_indices.long(), -1).amax(-1) + 1  # [B', H', nQB]
    return float(counts.sum()) / max(1.0, float(last.sum()))


def masked_prefix_attention(q: Tensor, k: Tensor, v: Tensor, bs: BlockSparse, scale: float) -> Tensor:
    """Fused SDPA per chunk of query rows over the keys up to the chunk's last kept block, the BlockSparse expanded
    to an element mask for those rows only (memory O(rows × Skv × heads)); rows with nothing kept give zeros."""
    B, Hq, Sq, D = q.shape
    Skv = k.shape[2]
    bq, bkv = bs.block_size
    nkb = -(-Skv // bkv)
    # tile 0: not kept, 1: full, 2..: the partial bit tiles
    tiles = torch.cat([torch.zeros(1, bq, bkv, dtype=torch.bool, device=q.device),
                       torch.ones(1, bq, bkv, dtype=torch.bool, device=q.device), unpack_bits(bs.tiles, bkv)])
    shape = (B, Hq, len(bs.q_blocks))
    live = torch.arange(bs.kv_indices.shape[-1], device=q.device) < bs.kv_counts.expand(shape).long().unsqueeze(-1)
    idx = torch.where(live, bs.kv_indices.expand(*shape, -1).long(), nkb)  # padding -> a dummy block, dropped
    tile_of = torch.zeros(*shape, nkb + 1, dtype=torch.long, device=q.device)
    tile_of.scatter_(3, idx, torch.where(live, bs.tile_ids.expand(*shape, -1).long() + 2, 0))
    tile_of = tile_of[..., :nkb]  # [B, Hq, nQB, nKB]: which tile each (query block, kv block) uses
    kept = (tile_of > 0).flip(-1).cumsum(-1).flip(-1) > 0  # blocks at or before the row's last kept block
    on_column = None
    if bs.columns is not None:  # gathered columns as a per-(batch, head) key mask, seen by every causal query
        on_column = torch.zeros(*bs.columns.shape[:2], Skv + 1, dtype=torch.bool, device=q.device)
        on_column.scatter_(-1, bs.columns.long().clamp(max=Skv), True)
        on_column = on_column[..., :Skv].expand(B, Hq, -1)
    per_chunk = max(1, _PREFIX_ROWS // bq)
    gqa = Hq != k.shape[1]
    if gqa and torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):  # sum the heads' grads in fp32
        k, v = (_wide_for_grad(t, q.dtype).repeat_interleave(Hq // k.shape[1], 1).to(q.dtype) for t in (k, v))
        gqa = False
    out = torch.empty_like(q)
    for lo in range(0, shape[2], per_chunk):
        hi = min(shape[2], lo + per_chunk)
        q_lo, q_hi = lo * bq, min(Sq, hi * bq)
        n_kv = int(kept[..., lo:hi, :].any(-2).any(0).any(0).sum())
        if on_column is not None:  # columns reach up to the chunk's last causal position
            n_kv = max(n_kv, min(nkb, -(-(q_hi + Skv - Sq) // bkv)))
        n_kv = max(n_kv, 1)  # an all-empty chunk still runs (its rows are zeroed below), keeping k, v in the graph
        kv_hi = min(Skv, n_kv * bkv)
        t = tile_of[..., lo:hi, :n_kv]  # [B, Hq, n, m]
        allowed = tiles[t].permute(0, 1, 2, 4, 3, 5).reshape(B, Hq, (hi - lo) * bq, n_kv * bkv)
        allowed = allowed[:, :, :q_hi - q_lo, :kv_hi]
        if on_column is not None:
            q_pos = torch.arange(q_lo, q_hi, device=q.device).view(-1, 1) + Skv - Sq
            causal = torch.arange(kv_hi, device=q.device) <= q_pos  # [rows, kv_hi]
            allowed = allowed | (on_column[:, :, None, :kv_hi] & causal)
        o = F.scaled_dot_product_attention(q[:, :, q_lo:q_hi], k[:, :, :kv_hi], v[:, :, :kv_hi], attn_mask=allowed,
                                           scale=scale, enable_gqa=gqa)
        empty = ~allowed.any(-1)  # [B, Hq, rows]: nothing kept in the row
        out[:, :, q_lo:q_hi] = torch.where(empty.unsqueeze(-1), 0, o) if bool(empty.any()) else o
    return out


def _column_keys(kx: Tensor, vx: Tensor, bs: BlockSparse, lo: int, hi: int, bh: tuple[int, int], b_ix: Tensor,
                 h_ix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """K, V of the gathered columns visible to query blocks [lo, hi) ([B, Hq, n, C, D]) and their allowed mask
    [B, Hq, n, bq, C]: slot in use, column at or before the query, kv block not in the query block's list."""
    cols, ends, kept = bs.column_lists()
    bq, bkv = bs.block_size
    n = hi - lo
    used = max(1, int(ends[..., lo:hi].max()))
    c = cols[..., :used].expand(*bh, -1).long()
    cc = c.clamp(max=kx.shape[2] - 1)
    kc = kx[b_ix, h_ix, cc].unsqueeze(2).expand(-1, -1, n, -1, -1)
    vc = vx[b_ix, h_ix, cc].unsqueeze(2).expand(-1, -1, n, -1, -1)
    kb = (cc // bkv)[:, :, None, :]
    word = torch.gather(kept[:, :, lo:hi].expand(*bh, -1, -1), -1, (kb // 32).expand(-1, -1, n, -1))
    outside = ((word >> (kb % 32)) & 1) == 0
    slot = torch.arange(used, device=kx.device)
    ok = (slot.view(1, 1, 1, -1) < ends[..., lo:hi, None].expand(*bh, -1, -1)) & outside  # [B, Hq, n, C]
    q_pos = (torch.arange(lo * bq, hi * bq, device=kx.device) + bs.seq_kv - bs.seq_q).view(n, bq, 1)
    allowed = ok[:, :, :, None, :] & (c[:, :, None, None, :] <= q_pos)
    return kc, vc, allowed
