"""The CPU gather path (only retained blocks computed) against the fp64 oracle, forward and backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from longattn import masks
from longattn.kernels import gather
from longattn.kernels.gather import block_gather_attention
from longattn.masks.block_sparse import BlockSparse
from tests.kernels.test_block_sparse_kernel import ALL_FACTORIES
from tests.oracle import check_against_oracle


def _inputs(B, Hq, Hkv, Sq, Skv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Sq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Skv, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Skv, D, generator=g, dtype=dtype))


STRATEGIES = ["lse", "blocks", "prefix"]


def _run(bs, scale=0.3, fused: bool | str = False):
    """The explicit-softmax path (with LSE), or without LSE the fused SDPA strategies: over gathered blocks
    ("blocks"), over each query chunk's masked key prefix ("prefix"), or whichever the density picks (True). Their
    out and gradients are checked; the LSE checked beside them comes from the explicit path."""
    share = {"blocks": float("inf"), "prefix": -1.0}.get(fused, gather._PREFIX_SHARE)

    def run(q, k, v, bias):
        out, lse = block_gather_attention(q, k, v, bs, scale)
        if fused and fused != "lse":
            saved, gather._PREFIX_SHARE = gather._PREFIX_SHARE, share
            try:
                out, none = block_gather_attention(q, k, v, bs, scale, return_lse=False)
            finally:
                gather._PREFIX_SHARE = saved
            assert none is None
        return out, lse
    return run


@pytest.mark.parametrize("fused", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("Sq", "Skv", "Hq", "Hkv", "block"), [(1, 1, 2, 2, (16, 32)), (127, 127, 4, 1, (32, 64)),
                                                               (70, 300, 8, 1, (64, 32)), (1, 1000, 4, 4, (16, 64))])
def test_matches_oracle(Sq, Skv, Hq, Hkv, block, dtype, fused):
    q, k, v = _inputs(2, Hq, Hkv, Sq, Skv, 32, dtype)
    mask = masks.sinks(3, 50, offset=Skv - Sq) | masks.dilated(2, 3, granularity=32, offset=Skv - Sq)
    bs = BlockSparse.from_mask_mod(mask, 2, Hq, Sq, Skv, block)
    check_against_oracle(_run(bs, fused=fused), q, k, v, mask=mask, scale=0.3)


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_every_mask_factory(name):
    q, k, v = _inputs(1, 4, 2, 160, 160, 32, torch.bfloat16)
    mask = ALL_FACTORIES[name]()
    bs = BlockSparse.from_mask_mod(mask, 1, 4, 160, 160, (32, 32))
    check_against_oracle(_run(bs, fused="blocks"), q, k, v, mask=mask, scale=0.3)
    check_against_oracle(_run(bs, fused="prefix"), q, k, v, mask=mask, scale=0.3)


@given(sq=st.integers(1, 150), skv=st.integers(1, 150), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_random_block_masks(sq, skv, density, seed):
    q, k, v = _inputs(1, 4, 2, sq, skv, 16, torch.float16, seed)
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(1, 4, -(-sq // 16), -(-skv // 32), generator=g) < density
    bs = BlockSparse.from_block_mask(blocks, sq, skv, (16, 32))
    check_against_oracle(_run(bs, fused=STRATEGIES[seed % 3]), q, k, v, mask=bs, scale=0.3)


def test_prefix_share_picks_the_strategy():
    """A sliding window over a long row keeps few of its prefix blocks (gather them); causal keeps all of them."""
    window = BlockSparse.from_mask_mod(masks.sliding_window(64), 1, 1, 1024, 1024, (64, 64))
    causal = BlockSparse.from_mask_mod(masks.causal(), 1, 1, 1024, 1024, (64, 64))
    assert gather.prefix_share(window) < gather._PREFIX_SHARE < gather.prefix_share(causal) == 1.0


def test_packed_block_sparse_is_refused():
    cu = torch.tensor([0, 5, 40])
    bs = BlockSparse.from_mask_mod(masks.full(), 1, 1, 40, 40, 32, cu_seqlens_q=cu)
    q = torch.zeros(1, 1, 40, 16)
    with pytest.raises(ValueError, match="mask: the gather path takes plain"):
        block_gather_attention(q, q, q, bs, 1.0)
