"""MInference A-shape: exact sink + window pattern, oracle rule on its BlockSparse, density, bad budgets."""

from __future__ import annotations

import pytest
import torch

from longattn.methods.prefill.minference_ashape import MInferenceAShape
from longattn.methods.registry import get
from tests.methods.prefill_checks import (
    ORACLE_GRID,
    ORACLE_IDS,
    causal_dense,
    check_density,
    check_keeps_everything,
    check_oracle,
    qkv,
)


@pytest.mark.parametrize(("Sq", "Skv", "Hkv", "dtype", "D"), ORACLE_GRID, ids=ORACLE_IDS)
@pytest.mark.parametrize("token_level", [None, pytest.param(False, marks=pytest.mark.slow)])
def test_oracle_rule_and_density(Sq, Skv, Hkv, dtype, D, token_level):
    q, k, v = qkv(Sq, Skv, Hkv=Hkv, D=D, dtype=dtype)
    m = MInferenceAShape(n_init=20, n_local=70, token_level=token_level)
    bs = m.estimate(q, k)
    check_oracle(bs, q, k, v)
    check_density(bs, m.last_density)


@pytest.mark.parametrize(("Sq", "Skv"), [(300, 300), (1, 300), (130, 300)])
def test_token_level_pattern_is_exactly_sinks_and_window(Sq, Skv):
    q, k, _ = qkv(Sq, Skv)
    dense = MInferenceAShape(n_init=20, n_local=70).estimate(q, k).to_dense().cpu()
    i, j = torch.arange(Skv - Sq, Skv).view(-1, 1), torch.arange(Skv).view(1, -1)
    expected = ((j < 20) | (i - j < 70)) & causal_dense(Sq, Skv)
    assert torch.equal(dense, expected.expand_as(dense))
    whole = MInferenceAShape(n_init=20, n_local=70, token_level=False).estimate(q, k).to_dense().cpu()
    assert (whole & ~dense).any() and not (dense & ~whole).any()  # block granularity: a strict superset


def test_budget_of_the_whole_context_is_dense():
    q, k, v = qkv(300, Hkv=2)
    check_keeps_everything(MInferenceAShape(n_init=0, n_local=300).estimate(q, k), q, k, v)


def test_bad_input():
    q, k, _ = qkv(100)
    assert get("minference_ashape").factory is MInferenceAShape
    with pytest.raises(ValueError, match="n_init \\+ n_local: budget of 150 tokens exceeds the context of 100"):
        MInferenceAShape(n_init=50, n_local=100).estimate(q, k)
    with pytest.raises(ValueError, match="n_local: expected an int >= 1"):
        MInferenceAShape(n_local=0)
    with pytest.raises(ValueError, match="n_init: expected an int >= 0"):
        MInferenceAShape(n_init=-1)
    with pytest.raises(ValueError, match="block: expected a power of two"):
        MInferenceAShape(block=48)
    with pytest.raises(ValueError, match="query heads \\(3\\) must be a multiple"):
        MInferenceAShape(n_init=1, n_local=1).estimate(q[:, :3], k)
