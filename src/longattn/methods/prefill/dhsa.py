"""DHSA, Dynamic Hierarchical Sparse Attention (Xiong et al. 2025): cut the sequence into variable-length chunks,
score chunk pairs with length-normalised chunk representations, and upsample the chunk scores to decide which
token pairs to keep."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longattn import masks
from longattn.masks.block_sparse import BlockSparse, TileFn, pack_bits
from longattn.masks.core import BoundsFn, MaskMod
from longattn.methods.prefill._blocks import Geometry, geometry, own_key, presence, square_block, to_block_sparse
from longattn.methods.prefill._select import check_budget, check_int
from longattn.methods.prefill.base import PrefillMethod
from longattn.methods.registry import register


@register("dhsa", "prefill", paper="DHSA: Dynamic Hierarchical Sparse Attention (Xiong et al. 2025)")
class DHSA(PrefillMethod):
    """Chunking: each ``chunk_size``-token window gets one boundary, after the position whose key is least similar
    to the next one (cosine, mean over kv heads), so chunks follow content and are 1..2*chunk_size-1 tokens long
    (DHSA learns its boundary predictor; key similarity is the training-free stand-in). Chunk representation:
    mean of its queries / keys times sqrt(chunk length) (the paper's length normalisation). Each query chunk keeps
    its best-scoring causal key chunks until ``budget`` tokens are covered (the upsampled chunk score is constant
    over a chunk pair, so the token top-k takes whole chunks), plus its own chunk. Token-exact inside blocks.

    Defaults: budget 2048 tokens, chunk_size 64, block 64. Budgets over the context length are errors.
    """

    def __init__(self, budget: int = 2048, chunk_size: int = 64, block: int = 64):
        self.budget = check_int("budget", budget)
        self.chunk_size = check_int("chunk_size", chunk_size, low=2)
        self.block = square_block(block)

    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        self.check(q, k)
        B, Hq, Sq, D = q.shape
        Skv = k.shape[2]
        check_budget("budget", self.budget, Skv, "tokens")
        check_budget("chunk_size", self.chunk_size, Skv, "tokens")
        geo = geometry(Sq, Skv, self.block, q.device)
        ids, n_chunks = chunk_ids(k, self.chunk_size)  # [B, Skv]
        q_ids = ids[:, Skv - Sq:]
        kx = k.float().repeat_interleave(Hq // k.shape[1], dim=1)
        q_rep = _chunk_rep(q.float(), q_ids, n_chunks)
        k_rep = _chunk_rep(kx, ids, n_chunks)
        scores = q_rep @ k_rep.transpose(-1, -2) / math.sqrt(D)  # [B, Hq, Nc, Nc]
        ones = torch.ones_like(ids, dtype=torch.float)
        lengths = torch.zeros(B, n_chunks, device=q.device).scatter_add_(1, ids, ones)
        chunk = torch.arange(n_chunks, device=q.device)
        causal = chunk.view(1, -1) <= chunk.view(-1, 1)
        scores = scores.masked_fill(~causal, -math.inf)
        order = scores.argsort(dim=-1, descending=True)
        sorted_len = torch.gather(lengths.view(B, 1, 1, -1).expand_as(scores), -1, order)
        before = sorted_len.cumsum(-1) - sorted_len  # tokens already covered when a chunk is reached
        take = (before < self.budget) & torch.gather(causal.expand_as(scores), -1, order)
        keep = torch.zeros_like(take).scatter_(-1, order, take) | torch.eye(n_chunks, dtype=torch.bool,
                                                                              device=q.device)
        q_lab = q_ids.view(B, 1, Sq).expand(B, Hq, Sq)
        k_lab = ids.view(B, 1, Skv).expand(B, Hq, Skv)
        qp = presence(q_lab, n_chunks, geo.block[0])
        kp = presence(k_lab, n_chunks, geo.block[1])
        selected = (qp @ keep.float() @ kp.transpose(-1, -2)) > 0

        def dhsa_rule(b, h, q_idx, kv_idx):
            return keep[b, h, q_ids[b, q_idx], ids[b, kv_idx]]

        rule = MaskMod(dhsa_rule, bounds=chunk_pair_bounds(keep, q_ids, ids), name="dhsa_chunks")
        self.last_blocks = to_block_sparse(selected, geo, rule, tiles=chunk_pair_tiles(keep, q_ids, ids, geo))
        return self.last_blocks


def chunk_ids(k: Tensor, chunk_size: int) -> tuple[Tensor, int]:
    """Chunk index of every key position [B, Skv] and the chunk count (the same for every batch row)."""
    B, _, Skv, _ = k.shape
    kn = torch.nn.functional.normalize(k.float(), dim=-1)
    sim = (kn[:, :, :-1] * kn[:, :, 1:]).sum(-1).mean(1)  # [B, Skv - 1]: similarity of t and t + 1
    n_win = (Skv - 1) // chunk_size  # whole windows of candidate cut points
    starts = torch.zeros(B, Skv, dtype=torch.long, device=k.device)
    starts[:, 0] = 1
    if n_win:
        weakest = sim[:, : n_win * chunk_size].view(B, n_win, chunk_size).argmin(-1)
        cut = weakest + torch.arange(n_win, device=k.device) * chunk_size + 1  # a chunk starts after the cut
        starts.scatter_(1, cut, 1)
    return starts.cumsum(1) - 1, n_win + 1


def _chunk_rep(x: Tensor, ids: Tensor, n_chunks: int) -> Tensor:
    """Length-normalised chunk representations [B, H, Nc, D]: mean over the chunk times sqrt(its length)."""
    B, H, S, D = x.shape
    sums = torch.zeros(B, H, n_chunks, D, device=x.device)
    sums.scatter_add_(2, ids.view(B, 1, S, 1).expand(B, H, S, D), x)
    count = torch.zeros(B, n_chunks, device=x.device).scatter_add_(1, ids, torch.ones_like(ids, dtype=x.dtype))
    count = count.view(B, 1, n_chunks, 1)
    return sums / count.clamp(min=1) * count.sqrt()


def chunk_pair_bounds(keep: Tensor, q_ids: Tensor, k_ids: Tensor) -> BoundsFn:
    """Exact block bounds of the rule ``keep[b, h, q_ids[b, q], k_ids[b, kv]]``: a rectangle of tokens covers a
    rectangle of chunk pairs (ids are non-decreasing), whose kept count comes from a 2-D prefix sum. This lets the
    block builder settle most blocks without evaluating them token by token (millions of blocks at 128k)."""
    B, H, Nq, Nk = keep.shape
    prefix = torch.zeros(B, H, Nq + 1, Nk + 1, dtype=torch.int32, device=keep.device)
    prefix[:, :, 1:, 1:] = keep.int().cumsum(-1, dtype=torch.int32).cumsum(-2, dtype=torch.int32)

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        r0, r1 = q_ids[b, q_lo], q_ids[b, q_hi] + 1
        c0, c1 = k_ids[b, kv_lo], k_ids[b, kv_hi] + 1
        kept = prefix[b, h, r1, c1] - prefix[b, h, r0, c1] - prefix[b, h, r1, c0] + prefix[b, h, r0, c0]
        return kept > 0, kept == (r1 - r0) * (c1 - c0)

    return bounds


def chunk_pair_tiles(keep: Tensor, q_ids: Tensor, k_ids: Tensor, geo: Geometry) -> TileFn:
    """Packed tiles of causal & (chunk rule | own key) on listed blocks, built from the chunk structure instead of
    token by token: a block spans a few chunks per axis, so each tile row is an OR of per-chunk column masks chosen
    by the block's small kept-chunk matrix (~30x fewer operations than evaluating 64 x 64 elements)."""
    B, H, Nq, Nk = keep.shape
    bq, bkv = geo.block
    q_first, q_local, q_valid = _block_chunks(q_ids, bq)
    k_first, k_local, k_valid = _block_chunks(k_ids, bkv)
    n_rows, n_cols = int(q_local.max()) + 1, int(k_local.max()) + 1  # most chunks one block spans, per axis
    in_chunk = (k_local.unsqueeze(2) == torch.arange(n_cols, device=keep.device).view(1, 1, -1, 1)) & k_valid[:, None]
    col_words = pack_bits(in_chunk.flatten(0, 1)).view(B, -1, n_cols, bkv // 32)  # [B, nKB, Jk, words]
    causal = _tile_table(masks.causal(offset=geo.offset), geo)
    own = _tile_table(own_key(geo.offset), geo)

    def tiles(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        n = b.numel()
        rows = (q_first[b, q].view(-1, 1) + torch.arange(n_rows, device=b.device)).clamp(max=Nq - 1)
        cols = (k_first[b, k].view(-1, 1) + torch.arange(n_cols, device=b.device)).clamp(max=Nk - 1)
        kept = keep[b.view(-1, 1, 1), h.view(-1, 1, 1), rows.view(n, -1, 1), cols.view(n, 1, -1)]  # [n, Jq, Jk]
        per_row = torch.gather(kept, 1, q_local[b, q].unsqueeze(-1).expand(n, bq, n_cols))  # [n, bq, Jk]
        words = (per_row.int().unsqueeze(-1) * col_words[b, k].unsqueeze(1)).sum(2, dtype=torch.int32)
        words = words * q_valid[q].view(n, bq, 1)  # disjoint bits per chunk: the sum is the OR
        return (words & causal[0][causal[1][q, k]]) | own[0][own[1][q, k]]

    return tiles


def _block_chunks(ids: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per block of ``block`` positions: its first chunk [B, n], each position's chunk relative to it [B, n, block]
    (positions past the end repeat the last) and which positions exist [n, block]."""
    S = ids.shape[1]
    pos = torch.arange(math.ceil(S / block) * block, device=ids.device).view(-1, block)
    labels = ids[:, pos.clamp(max=S - 1)]
    return labels[:, :, 0], labels - labels[:, :, :1], pos < S


def _tile_table(mask: MaskMod, geo: Geometry) -> tuple[Tensor, Tensor]:
    """A fixed mask's packed tile table and each block's row in it [nQB, nKB] (``BlockSparse.packed_lookup``)."""
    bs = BlockSparse.from_mask_mod(mask, 1, 1, geo.seq_q, geo.seq_kv, geo.block, device=geo.q_first.device)
    code, table = bs.packed_lookup()
    return table, code[0, 0]
