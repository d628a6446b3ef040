"""HyperAttention: oracle rule on its sparsity, reported density, dense with one bucket, planted clusters, the causal
recursion's exact pieces, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from longattn.methods.prefill.hyper import HyperAttention, _lsh_rank, exact_piece
from longattn.methods.registry import get
from tests.methods.prefill_checks import SHAPES, causal_dense, check_keeps_everything, check_standard, qkv


@pytest.mark.parametrize(("Sq", "Skv", "Hq", "Hkv", "D", "dtype"), SHAPES)
def test_oracle_and_density(Sq, Skv, Hq, Hkv, D, dtype):
    method = HyperAttention(bucket_size=32, sample_size=min(8, Skv), min_seq_len=64, block=32)
    check_standard(method, Sq, Skv, Hq, Hkv, D, dtype)


@pytest.mark.parametrize(("Sq", "Skv"), [(300, 300), (130, 300)])
def test_one_bucket_is_dense(Sq, Skv):
    q, k, v = qkv(Sq, Skv)
    check_keeps_everything(HyperAttention(bucket_size=Skv, sample_size=0, block=32).estimate(q, k), q, k, v)


@given(bits=st.integers(1, 12))
def test_gray_order_puts_one_bit_neighbours_next_to_each_other(bits):
    codes = torch.arange(2**bits)
    signs = ((codes.view(-1, 1) >> torch.arange(bits)) & 1).float() * 2 - 1  # every sign pattern once
    rank = _lsh_rank(signs)
    assert torch.equal(rank.sort().values, codes)  # a bijection on the buckets
    by_rank = codes[rank.argsort()]
    flips = by_rank[1:] ^ by_rank[:-1]
    assert bool((flips & (flips - 1) == 0).all())  # consecutive buckets differ in exactly one hyperplane


def _clustered(S: int, n: int, seed: int = 0):
    """q and k drawn from n directions, each direction used by S / n tokens (in shuffled positions)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n, 32, generator=g), dim=-1)
    q_dir, k_dir = torch.randperm(S, generator=g) % n, torch.randperm(S, generator=g) % n
    q = (dirs[q_dir] + 0.01 * torch.randn(S, 32, generator=g)).view(1, 1, S, 32)
    k = (dirs[k_dir] + 0.01 * torch.randn(S, 32, generator=g)).view(1, 1, S, 32)
    return q, k, q_dir, k_dir


def test_planted_clusters_meet_exactly():
    S, n = 256, 4
    q, k, q_dir, k_dir = _clustered(S, n)
    bs = HyperAttention(lsh_bits=7, bucket_size=S // n, sample_size=0, min_seq_len=1, block=32).estimate(q, k)
    same = (q_dir.view(-1, 1) == k_dir.view(1, -1)) | torch.eye(S, dtype=torch.bool)
    assert torch.equal(bs.to_dense()[0, 0], same & causal_dense(S, S))


def test_sampled_columns_are_whole_causal_columns():
    q, k, _ = qkv(256, Hq=2, Hkv=2)
    plain, sampled = (HyperAttention(bucket_size=32, sample_size=n, min_seq_len=1, block=32, seed=1).estimate(q, k)
                      .to_dense()[0] for n in (0, 5))
    later = causal_dense(256, 256).unsqueeze(0)

    def full_columns(allowed):  # [H, S]: every query at or after the key sees it
        return (allowed | ~later).all(1)

    added = sampled & ~plain
    new_cols = full_columns(sampled) & ~full_columns(plain)
    assert bool((plain <= sampled).all())  # sampling only adds pairs
    assert bool((~added.any(1) | new_cols).all())  # ... and only whole causal columns
    counts = new_cols.sum(-1)
    assert int(counts.max()) <= 5 and int(counts.min()) >= 4  # a sampled column may already be full by its group


@pytest.mark.parametrize(("seq", "min_len", "piece"), [(8000, 4096, 4000), (4096, 4096, 4096), (300, 64, 38),
                                                        (300, 1, 1)])
def test_exact_piece_halves_until_short_enough(seq, min_len, piece):
    assert exact_piece(seq, min_len) == piece


def test_causal_recursion_is_exact_inside_diagonal_pieces():
    """Pairs in the same 64-token piece are all kept; other pairs only by the LSH groups; short inputs are exact."""
    S = 256
    q, k, _ = qkv(S, Hq=2, Hkv=2)
    pos = torch.arange(S)
    same = (pos.view(-1, 1) // 64 == pos.view(1, -1) // 64) & causal_dense(S, S)
    lsh_only = HyperAttention(bucket_size=32, sample_size=0, min_seq_len=1, block=32).estimate(q, k).to_dense()[0]
    both = HyperAttention(bucket_size=32, sample_size=0, min_seq_len=64, block=32).estimate(q, k).to_dense()[0]
    assert torch.equal(both, lsh_only | same)
    assert not bool((lsh_only >= same).all())  # the pieces add pairs the groups alone miss
    q, k, v = qkv(300)
    check_keeps_everything(HyperAttention(bucket_size=32, sample_size=0, block=32).estimate(q, k), q, k, v)


def test_registered_and_bad_input():
    assert get("hyper").factory is HyperAttention
    for kwargs, match in [({"lsh_bits": 31}, r"lsh_bits: expected an int in \[1, 30\]"),
                          ({"bucket_size": 0}, "bucket_size: expected an int >= 1"),
                          ({"sample_size": -1}, "sample_size: expected an int >= 0"),
                          ({"min_seq_len": 0}, "min_seq_len: expected an int >= 1"),
                          ({"block": 16}, "block: expected a power of two")]:
        with pytest.raises(ValueError, match=match):
            HyperAttention(**kwargs)
    q, k, _ = qkv(100)
    with pytest.raises(ValueError, match=r"bucket_size: budget of 256 tokens exceeds the context of 100 tokens"):
        HyperAttention().estimate(q, k)
    with pytest.raises(ValueError, match=r"sample_size: budget of 256 tokens exceeds"):
        HyperAttention(bucket_size=50).estimate(q, k)
