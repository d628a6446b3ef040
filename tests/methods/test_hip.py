"""HiP: hierarchical top-k keeps k blocks per query block, finds a planted hot region, oracle rule, density,
whole-context budget is dense, bad knobs."""

from __future__ import annotations

import pytest
import torch

from longattn.masks.block_sparse import EMPTY
from longattn.methods.prefill import _select
from longattn.methods.prefill.hip import HiP
from longattn.methods.registry import get
from tests.methods.prefill_checks import (
    ORACLE_GRID,
    ORACLE_IDS,
    check_density,
    check_keeps_everything,
    check_oracle,
    qkv,
)


@pytest.mark.parametrize(("Sq", "Skv", "Hkv", "dtype", "D"), ORACLE_GRID, ids=ORACLE_IDS)
def test_oracle_rule_and_density(Sq, Skv, Hkv, dtype, D):
    q, k, v = qkv(Sq, Skv, Hkv=Hkv, D=D, dtype=dtype)
    m = HiP(top_k=64)
    bs = m.estimate(q, k)
    check_oracle(bs, q, k, v)
    check_density(bs, m.last_density)


@pytest.mark.parametrize(("Sq", "Skv", "top_k"), [(1000, 1000, 96), (300, 1000, 160), (127, 127, 32)])
def test_every_query_block_keeps_k_blocks_plus_its_diagonal(Sq, Skv, top_k):
    q, k, _ = qkv(Sq, Skv)
    block = (32, 32)
    selected = HiP(top_k=top_k).estimate(q, k).block_map()[0] != EMPTY
    diag = _select.diagonal_blocks(Sq, Skv, block, "cpu")
    reach = diag.int().argmax(-1) + 1
    kept = selected.sum(-1)
    k_blocks = top_k // 32
    lo, hi = torch.minimum(reach, torch.tensor(k_blocks)), torch.minimum(reach, torch.tensor(k_blocks + 1))
    assert ((kept >= lo) & (kept <= hi)).all()
    assert (selected & diag).sum(-1).eq(1).all()


def test_planted_hot_region_is_found():
    S, D = 1024, 32
    q, k, _ = qkv(S, Hq=2, Hkv=2, D=D)
    u = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(7)), dim=0)
    q[:, :, -32:] += 3 * u
    k[:, :, 256:512] += 3 * u  # a smooth hot region of 8 key blocks, far from the last query block
    selected = HiP(top_k=64).estimate(q, k).block_map()[0][0, :, -1] != EMPTY
    chosen = [set(torch.nonzero(row).flatten().tolist()) - {31} for row in selected]
    assert all(len(c) == 2 and c <= set(range(8, 16)) for c in chosen), chosen


@pytest.mark.parametrize(("Sq", "Skv"), [(300, 300), (1, 300), (100, 300)])
def test_whole_context_budget_is_dense(Sq, Skv):
    q, k, v = qkv(Sq, Skv)
    check_keeps_everything(HiP(top_k=Skv).estimate(q, k), q, k, v)


def test_bad_input():
    q, k, _ = qkv(300)
    assert get("hip").factory is HiP
    with pytest.raises(ValueError, match="top_k: budget of 512 tokens exceeds the context of 300 tokens"):
        HiP().estimate(q, k)
    with pytest.raises(ValueError, match="top_k: expected an int >= 1"):
        HiP(top_k=0)
    with pytest.raises(ValueError, match="block_q: expected a power of two >= 32"):
        HiP(block_q=48)
    with pytest.raises(ValueError, match="block_kv: expected a power of two >= 32"):
        HiP(block_kv=16)
