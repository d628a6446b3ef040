"""Block-gather attention: the CPU execution path for sparse masks, in plain vectorised PyTorch.

For a few query blocks at a time it gathers only the kv blocks their lists name, so the work is proportional to
the retained blocks (unlike the reference, which scores every pair and masks); gathered columns are appended by
index. Without LSE the gathered blocks go
through PyTorch's fused SDPA kernel (one pass, no score tensor kept); with LSE, through the explicit softmax the
reference uses. Differentiable through autograd.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from longattn.kernels.reference import softmax_attend
from longattn.masks.block_sparse import BlockSparse, _unpack_bits

_CHUNK_ELEMS = 1 << 23  # score elements (q rows × gathered keys × heads) held at once


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
    kx, vx = k.to(dtype), v.to(dtype)
    tiles = torch.cat([torch.ones(1, bq, bkv, dtype=torch.bool, device=q.device), _unpack_bits(bs.tiles, bkv)])
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
        kg = kx[b_ix, h_ix, tok].view(B, Hq, n, used * bkv, D)
        vg = vx[b_ix, h_ix, tok].view(B, Hq, n, used * bkv, D)
        bits = tiles[tile_ids[..., lo:hi, :used]]  # [B, Hq, n, E, bq, bkv]
        bits = bits.permute(0, 1, 2, 4, 3, 5).reshape(B, Hq, n, bq, used * bkv)
        allowed = allowed.view(B, Hq, n, 1, -1) & bits
        q_lo, q_hi = lo * bq, min(Sq, hi * bq)
        if bs.columns is not None:  # gathered columns: appended after the blocks' keys, causal, outside kept blocks
            kc, vc, ac = _column_keys(kx, vx, bs, lo, hi, (B, Hq), b_ix, h_ix)
            kg, vg = torch.cat([kg, kc], 3), torch.cat([vg, vc], 3)
            allowed = torch.cat([allowed, ac], 4)
        qc = F.pad(q[:, :, q_lo:q_hi].to(dtype), (0, 0, 0, n * bq - (q_hi - q_lo))).view(B, Hq, n, bq, D)
        yield qc, kg, vg, allowed, q_hi - q_lo


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
