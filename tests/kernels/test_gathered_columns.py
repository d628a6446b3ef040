"""Gathered columns (vertical lines loaded by index, BlockSparse.with_columns): the Triton forward kernel (under the
interpreter on CPU), the gather path and FlexAttention against the fp64 oracle; columns inside kept blocks counted
once; empty rows; density accounting; forward only."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longattn
import longattn.kernels.block_sparse as kbs
from longattn import masks
from longattn.kernels.block_sparse import BlockSparseAttention
from longattn.kernels.reference import reference_attention
from longattn.masks.block_sparse import BlockSparse
from tests.oracle import assert_close_to_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float16, torch.float32) if DEVICE == "cpu" else (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def nan_filled_outputs(monkeypatch):
    """Every buffer the kernel allocates starts as NaN, so a row it fails to write is caught."""
    real_like, real = kbs._empty_like, kbs._empty
    monkeypatch.setattr(kbs, "_empty_like", lambda t: real_like(t).fill_(float("nan")))
    monkeypatch.setattr(kbs, "_empty", lambda *a: real(*a).fill_(float("nan")))


def _inputs(B, Hq, Hkv, Sq, Skv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, s: torch.randn(B, h, s, D, generator=g).to(DEVICE, dtype)  # noqa: E731
    return mk(Hq, Sq), mk(Hkv, Skv), mk(Hkv, Skv)


def _columns_mask(B, H, Sq, Skv, block, seed, block_p=0.3, col_p=0.05) -> BlockSparse:
    """Random kept blocks (causal inside) on [1, H] plus random columns per (batch, head)."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-Sq // block[0]), -(-Skv // block[1])
    sel = torch.rand(1, H, nq, nk, generator=g) < block_p
    bs = BlockSparse.from_block_mask(sel.to(DEVICE), Sq, Skv, block, within=masks.causal(offset=Skv - Sq))
    return bs.with_columns((torch.rand(B, H, Skv, generator=g) < col_p).to(DEVICE))


def _check(bs: BlockSparse, q, k, v, impls=("triton", "gather")) -> None:
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), mask=bs)
    low, low_lse = reference_attention(q, k, v, mask=bs, compute_dtype=q.dtype)
    for impl in impls:
        with torch.no_grad():
            out, lse = longattn.attention(q, k, v, mask=bs, impl=impl, return_lse=True)
        assert_close_to_reference(out, ref, low, what=f"out ({impl})")
        assert_close_to_reference(lse, ref_lse, low_lse.double(), what=f"lse ({impl})")


GRID = [  # (Sq, Skv, D, Hq, Hkv, block)
    (1, 1, 64, 2, 2, (32, 32)),
    (127, 127, 64, 4, 1, (32, 64)),
    (300, 300, 32, 4, 2, (64, 64)),
    (1, 1000, 64, 4, 4, (16, 64)),
    (127, 300, 128, 4, 1, (64, 32)),
    (1000, 1000, 64, 2, 1, (128, 128)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GRID, ids=lambda s: f"q{s[0]}-kv{s[1]}-d{s[2]}-h{s[3]}/{s[4]}-blk{s[5][0]}x{s[5][1]}")
def test_matches_oracle(shape, dtype):
    Sq, Skv, D, Hq, Hkv, block = shape
    q, k, v = _inputs(2, Hq, Hkv, Sq, Skv, D, dtype)
    bs = _columns_mask(2, Hq, Sq, Skv, block, seed=Sq + Skv)
    assert bs.shape == (2, Hq, Sq, Skv)
    _check(bs, q, k, v)


@given(seed=st.integers(0, 10_000), col_p=st.floats(0.0, 0.5), block_p=st.floats(0.0, 1.0),
       Sq=st.integers(1, 200))
def test_random_columns_and_blocks(seed, col_p, block_p, Sq):
    Skv = 200
    q, k, v = _inputs(1, 2, 1, Sq, Skv, 32, torch.float32, seed=seed)
    bs = _columns_mask(1, 2, Sq, Skv, (32, 32), seed, block_p=block_p, col_p=col_p)
    _check(bs, q, k, v)


@pytest.mark.parametrize("strategy", ["blocks", "prefix"])
@pytest.mark.parametrize("Sq", [1, 127, 300])
def test_gather_strategies_without_lse(Sq, strategy, monkeypatch):
    """The fused no-LSE gather strategies (per gathered block, per masked key prefix) see the columns too."""
    from longattn.kernels import gather
    monkeypatch.setattr(gather, "_PREFIX_SHARE", {"blocks": float("inf"), "prefix": -1.0}[strategy])
    q, k, v = _inputs(2, 4, 2, Sq, 300, 32, torch.float32, seed=Sq)
    bs = _columns_mask(2, 4, Sq, 300, (64, 32), seed=Sq, block_p=0.2, col_p=0.1)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), mask=bs)
    low, _ = reference_attention(q, k, v, mask=bs, compute_dtype=q.dtype)
    out, _ = gather.block_gather_attention(q, k, v, bs, q.shape[-1] ** -0.5, return_lse=False)
    assert_close_to_reference(out, ref, low, what=f"out ({strategy})")


def test_columns_inside_kept_blocks_count_once():
    S, H = 300, 2
    q, k, v = _inputs(1, H, H, S, S, 32, DTYPES[-1])
    causal = BlockSparse.from_mask_mod(masks.causal(), 1, H, S, S, 64, device=DEVICE)
    every = causal.with_columns(torch.ones(1, H, S, dtype=torch.bool, device=DEVICE))
    assert torch.equal(every.to_dense(), causal.to_dense().expand(1, H, S, S))
    assert every.density() == causal.density() and every.mask_density() == causal.mask_density()
    ref, _ = reference_attention(q.double(), k.double(), v.double(), causal=True)
    low, _ = reference_attention(q, k, v, causal=True, compute_dtype=q.dtype)
    with torch.no_grad():
        assert_close_to_reference(longattn.attention(q, k, v, mask=every, impl="triton"), ref, low)
    # a column partly inside kept blocks: pairs inside come from the block (its causal mask), outside from the column
    sel = torch.zeros(1, H, 5, 5, dtype=torch.bool, device=DEVICE)
    sel[:, :, 2, 1] = True
    blocks = BlockSparse.from_block_mask(sel, S, S, 64, within=masks.causal())
    col = torch.zeros(1, H, S, dtype=torch.bool, device=DEVICE)
    col[:, :, 100] = True
    both = blocks.with_columns(col)
    dense = both.to_dense()[0, 0].cpu()
    i = torch.arange(S)
    assert torch.equal(dense[:, 100], i >= 100)
    assert int(dense.sum()) == 64 * 64 + (S - 100) - 64  # the 64 rows of query block 2 are not counted again
    assert abs(both.density() - int(dense.sum()) / S**2) < 1e-12
    assert abs(both.mask_density() - int(dense.sum()) / S**2) < 1e-12
    _check(both, q, k, v, impls=("triton", "gather", "flex"))


def test_rows_with_nothing_kept_give_zero_and_neg_inf_lse():
    S, H = 200, 2
    q, k, v = _inputs(1, H, 1, S, S, 32, DTYPES[0])
    none = torch.zeros(1, H, 4, 4, dtype=torch.bool, device=DEVICE)
    cols = torch.zeros(1, H, S, dtype=torch.bool, device=DEVICE)
    cols[:, 0, 150] = True  # head 0: rows >= 150 see one column; head 1: nothing at all
    bs = BlockSparse.from_block_mask(none, S, S, 64, within=masks.causal()).with_columns(cols)
    for impl in ("triton", "gather"):
        with torch.no_grad():
            out, lse = longattn.attention(q, k, v, mask=bs, impl=impl, return_lse=True)
        assert torch.equal(out[0, 0, :150].float().cpu(), torch.zeros(150, 32))
        assert torch.isneginf(lse[0, 0, :150]).all() and torch.isneginf(lse[0, 1]).all()
        assert torch.equal(out[0, 1].float().cpu(), torch.zeros(S, 32))
        torch.testing.assert_close(out[0, 0, 150:].float(), v[0, 0, 150].float().expand(50, -1))
    _check(bs, q, k, v)


def test_forward_only_raises_naming_the_mask():
    q, k, v = _inputs(1, 2, 2, 100, 100, 32, DTYPES[-1])
    bs = _columns_mask(1, 2, 100, 100, (32, 32), 0)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="mask: a BlockSparse with gathered columns"):
        BlockSparseAttention.apply(q, k, v, None, None, bs, 0.1)


def test_bad_columns():
    bs = BlockSparse.from_mask_mod(masks.causal(), 1, 2, 100, 100, 32)
    with pytest.raises(TypeError, match="columns: expected a 3-D bool tensor"):
        bs.with_columns(torch.zeros(1, 2, 100))
    with pytest.raises(ValueError, match="columns: expected 100 kv positions, got 99"):
        bs.with_columns(torch.zeros(1, 2, 99, dtype=torch.bool))
