"""HyperAttention (Han et al. 2023): sort queries and keys by an angular LSH (random hyperplanes) so that similar
ones become neighbours, attend within equal-size groups along the sorted order, and add a uniform sample of key
columns that every query sees. Causal inputs follow the paper's recursion: exact attention inside the diagonal
pieces of at most ``min_seq_len`` tokens, the approximation on the off-diagonal rectangles only."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longattn.masks.block_sparse import BlockSparse
from longattn.masks.core import MaskMod
from longattn.methods.prefill._blocks import geometry, label_blocks, square_block, to_block_sparse
from longattn.methods.prefill._select import check_budget, check_int
from longattn.methods.prefill.base import PrefillMethod
from longattn.methods.registry import register


@register("hyper", "prefill", paper="HyperAttention (Han et al. 2023), sortLSH blocks + sampled columns")
class HyperAttention(PrefillMethod):
    """Each token's ``lsh_bits`` hyperplane signs, read in Gray-code order (adjacent buckets differ in one bit),
    give its sort key; the i-th query in sorted order falls in group ``i * G // Sq`` and the j-th key in group
    ``j * G // Skv`` with ``G = ceil(Skv / bucket_size)``; a pair is kept when both share a group, or when the key is
    one of the ``sample_size`` sampled columns of the head (seeded per layer), always causally. The paper's causal
    algorithm halves the sequence until the pieces hold at most ``min_seq_len`` tokens and attends exactly inside
    each diagonal piece, so pairs whose positions fall in the same piece are kept too (at ``Skv <= min_seq_len``
    the method is exact attention).

    Granularity: the kept (q, k) pairs are scattered in position space, so a positional block is computed when it
    holds at least one kept pair, and inside it the pairs are masked exactly (bit tiles). Exact masking keeps the
    output faithful to the method; the retained work (the density reported) is the block union, which is what the
    kernels pay. Defaults from the reference implementation: 7 hyperplanes, 256-token buckets, 256 sampled columns,
    4096-token exact pieces. The sampled columns are not re-weighted by Skv / sample_size as in the paper's
    unbiased estimator (a mask cannot scale scores); they are attended as ordinary keys.
    """

    def __init__(self, lsh_bits: int = 7, bucket_size: int = 256, sample_size: int = 256, min_seq_len: int = 4096,
                 block: int = 64, seed: int = 0):
        self.lsh_bits = check_int("lsh_bits", lsh_bits)
        if self.lsh_bits > 30:
            raise ValueError(f"lsh_bits: expected an int in [1, 30], got {lsh_bits!r}")
        self.bucket_size = check_int("bucket_size", bucket_size)
        self.sample_size = check_int("sample_size", sample_size, low=0)
        self.min_seq_len = check_int("min_seq_len", min_seq_len)
        self.block, self.seed = square_block(block), check_int("seed", seed, low=0)

    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        self.check(q, k)
        B, Hq, Sq, D = q.shape
        Skv = k.shape[2]
        check_budget("bucket_size", self.bucket_size, Skv, "tokens")
        check_budget("sample_size", self.sample_size, Skv, "tokens")
        geo = geometry(Sq, Skv, self.block, q.device)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + layer)
        planes = torch.randn(D, self.lsh_bits, generator=gen).to(q.device)
        n_groups = math.ceil(Skv / self.bucket_size)
        q_lab = _sorted_group(_lsh_rank(q.float() @ planes), n_groups)
        k_lab = _sorted_group(_lsh_rank(k.float() @ planes), n_groups).repeat_interleave(Hq // k.shape[1], dim=1)
        sampled = torch.zeros(Hq, Skv, dtype=torch.bool)
        if self.sample_size:
            sampled.scatter_(1, torch.rand(Hq, Skv, generator=gen).argsort(-1)[:, : self.sample_size], True)
        sampled = sampled.to(q.device)
        n_kv = geo.kv_first.numel()
        col_blocks = torch.nn.functional.pad(sampled, (0, n_kv * geo.block[1] - Skv)).view(Hq, n_kv, -1).any(-1)
        piece = exact_piece(Skv, self.min_seq_len)
        same_piece = (geo.kv_first.view(1, -1) // piece <= geo.q_last.view(-1, 1) // piece) & (
            geo.kv_last.view(1, -1) // piece >= geo.q_first.view(-1, 1) // piece)
        selected = label_blocks(q_lab, k_lab, n_groups, geo) | col_blocks.view(1, Hq, 1, n_kv) | same_piece
        off = geo.offset

        def hyper_rule(b, h, q_idx, kv_idx):
            exact = (q_idx + off) // piece == kv_idx // piece
            return (q_lab[b, h, q_idx] == k_lab[b, h, kv_idx]) | sampled[h, kv_idx] | exact

        self.last_blocks = to_block_sparse(selected, geo, MaskMod(hyper_rule, name="hyper_groups"))
        return self.last_blocks


def exact_piece(seq: int, min_seq_len: int) -> int:
    """Length of the diagonal pieces the causal recursion attends exactly: ``seq`` halved until <= min_seq_len."""
    piece = seq
    while piece > min_seq_len:
        piece = -(-piece // 2)
    return piece


def _lsh_rank(proj: Tensor) -> Tensor:
    """Gray-code rank of the sign pattern of ``proj`` [..., bits]: neighbouring ranks differ in one hyperplane."""
    bits = (proj > 0).long()
    code = (bits << torch.arange(bits.shape[-1], device=proj.device)).sum(-1)
    rank, shift = code.clone(), 1
    while shift < bits.shape[-1]:
        rank ^= rank >> shift
        shift *= 2
    return rank


def _sorted_group(rank: Tensor, n_groups: int) -> Tensor:
    """Group of every token [B, H, S]: its place in the (rank, position) order, cut into n_groups equal parts."""
    S = rank.shape[-1]
    order = (rank * S + torch.arange(S, device=rank.device)).argsort(-1)
    place = torch.empty_like(order).scatter_(-1, order, torch.arange(S, device=rank.device).expand_as(order))
    return place * n_groups // S
