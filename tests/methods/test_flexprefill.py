"""FlexPrefill: per-head pattern choice on planted heads, cumulative-threshold selection, oracle rule, density,
gamma=1 is dense, bad knobs."""

from __future__ import annotations

import pytest
import torch

from longattn.methods.prefill import _select
from longattn.methods.prefill.flexprefill import FlexPrefill, js_distance
from longattn.methods.registry import get
from tests.methods.prefill_checks import (
    ORACLE_GRID,
    ORACLE_IDS,
    check_density,
    check_keeps_everything,
    check_method_density,
    check_oracle,
    qkv,
)


@pytest.mark.parametrize(("Sq", "Skv", "Hkv", "dtype", "D"), ORACLE_GRID, ids=ORACLE_IDS)
@pytest.mark.parametrize("block", [64, pytest.param(128, marks=pytest.mark.slow)])
def test_oracle_rule_and_density(Sq, Skv, Hkv, dtype, D, block):
    q, k, v = qkv(Sq, Skv, Hkv=Hkv, D=D, dtype=dtype)
    m = FlexPrefill(gamma=0.5, block=block)
    bs = m.estimate(q, k)
    check_oracle(bs, q, k, v)
    check_density(bs, m.last_density)
    assert m.last_query_aware.shape == (1, 4)


def test_planted_heads_choose_their_pattern_and_keep_the_hot_column():
    S, D, col = 512, 32, 200
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, S, D, generator=g), torch.randn(1, 2, S, D, generator=g)
    # head 0: queries and keys constant per 128-token block, so pooled scores are the true block attention (the
    # last key block, only partly visible to the last queries, is made unattractive so its count does not matter)
    a, c = torch.randn(S // 128, D, generator=g), torch.randn(S // 128, D, generator=g)
    c[-1] = -a[-1]
    q[0, 0], k[0, 0] = a.repeat_interleave(128, 0), c.repeat_interleave(128, 0)
    # head 1: one key column takes most of the attention, which mean-pooled keys cannot see
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    q[0, 1] += 3 * u
    k[0, 1, col] = 16 * u
    m = FlexPrefill(gamma=0.9, tau=0.1, block=128)
    dense = m.estimate(q, k).to_dense().cpu()
    assert m.last_query_aware.tolist() == [[True, False]]
    assert dense[0, 1, col:, col].all()  # every query that can see the hot column attends it
    assert m.last_density < 10 / 16  # something was pruned: all causal 128-blocks would be 10 of 16


def test_cumulative_mask_keeps_the_fewest_entries_reaching_gamma():
    scores = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    assert _select.cumulative_mask(scores, 0.5).tolist() == [[False, True, False, False]]
    assert _select.cumulative_mask(scores, 0.51).tolist() == [[False, True, True, False]]
    assert _select.cumulative_mask(scores, 1.0).tolist() == [[True] * 4]
    p = torch.tensor([[0.5, 0.5, 0.0]])
    assert js_distance(p, p).item() == 0.0
    assert abs(js_distance(p, torch.tensor([[0.0, 0.0, 1.0]])).item() - 0.6931471805599453 ** 0.5) < 1e-6


@pytest.mark.parametrize(("Sq", "Skv"), [(300, 300), (1, 300), (100, 300)])
def test_gamma_one_is_dense(Sq, Skv):
    q, k, v = qkv(Sq, Skv)
    check_keeps_everything(FlexPrefill(gamma=1.0, block=64).estimate(q, k), q, k, v)


def test_bad_input():
    assert get("flexprefill").factory is FlexPrefill
    for gamma in (0, 1.5, -0.1, "0.9"):
        with pytest.raises(ValueError, match="gamma: expected a number in \\(0, 1\\]"):
            FlexPrefill(gamma=gamma)
    for tau in (-0.1, 1.1):
        with pytest.raises(ValueError, match="tau: expected a number in \\[0, 1\\]"):
            FlexPrefill(tau=tau)
    with pytest.raises(ValueError, match="block: expected a power of two >= 32"):
        FlexPrefill(block=100)


def test_vertical_slash_heads_gather_their_columns():
    """Vertical-slash heads' columns are gathered (query-aware heads have none); density recounts from the element
    mask; the Triton kernel (interpreted on CPU) matches the oracle."""
    q, k, v = qkv(300, Hq=4, Hkv=2)
    m = FlexPrefill(gamma=0.5, tau=0.0, block=64)  # tau=0: every head takes the vertical-slash pattern
    bs = m.estimate(q, k)
    assert not m.last_query_aware.any() and bs.columns is not None
    assert (bs.column_counts > 0).all()
    check_method_density(m, bs)
    check_oracle(bs, q, k, v, impls=("reference", "gather", "triton"))
