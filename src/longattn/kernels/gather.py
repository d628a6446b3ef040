"""Block-gather attention: the CPU execution path for sparse masks, in plain vectorised PyTorch.

For a few query blocks at a time it gathers only the kv blocks their lists name, so the work is proportional to
the retained blocks (unlike the reference, which scores every pair and masks). Differentiable through autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.kernels.reference import softmax_attend
from longattn.masks.block_sparse import BlockSparse, _unpack_bits

_CHUNK_ELEMS = 1 << 24  # score elements (q rows × gathered keys × heads) held at once


def block_gather_attention(q: Tensor, k: Tensor, v: Tensor, bs: BlockSparse, scale: float,
                           compute_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(out [B, Hq, Sq, D] in q.dtype, lse [B, Hq, Sq]; -inf where nothing is attended). Computes in float32 for
    half inputs (float64 stays float64), like the reference."""
    if bs.varlen:
        raise ValueError("mask: the gather path takes plain (not packed variable-length) BlockSparse masks")
    B, Hq, Sq, D = q.shape
    group = Hq // k.shape[1]
    bq, bkv = bs.block_size
    if compute_dtype is None:
        compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    kx = (k.repeat_interleave(group, 1) if group > 1 else k).to(compute_dtype)
    vx = (v.repeat_interleave(group, 1) if group > 1 else v).to(compute_dtype)
    tiles = torch.cat([torch.ones(1, bq, bkv, dtype=torch.bool, device=q.device), _unpack_bits(bs.tiles, bkv)])
    shape = (B, Hq, len(bs.q_blocks))
    idx = bs.kv_indices.expand(*shape, -1).long()
    counts = bs.kv_counts.expand(shape)
    tile_ids = bs.tile_ids.expand(*shape, -1).long() + 1  # 0 = full block
    width = max(1, int(counts.max()))
    per_chunk = max(1, _CHUNK_ELEMS // (B * Hq * bq * width * bkv))
    b_ix = torch.arange(B, device=q.device).view(B, 1, 1)
    h_ix = torch.arange(Hq, device=q.device).view(1, Hq, 1)
    cols = torch.arange(bkv, device=q.device)
    outs, lses = [], []
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
        qc = torch.nn.functional.pad(q[:, :, q_lo:q_hi].to(compute_dtype), (0, 0, 0, n * bq - (q_hi - q_lo)))
        s = (qc.view(B, Hq, n, bq, D) @ kg.transpose(-1, -2)) * scale
        o, lse = softmax_attend(s, vg, allowed)
        outs.append(o.reshape(B, Hq, n * bq, D)[:, :, : q_hi - q_lo])
        lses.append(lse.reshape(B, Hq, n * bq)[:, :, : q_hi - q_lo])
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)
