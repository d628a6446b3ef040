"""MInference vertical-slash: planted columns / diagonals are found, oracle rule, density, dense budget, errors."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.kernels.reference import reference_attention
from longattn.methods.prefill.minference_vertical_slash import MInferenceVerticalSlash
from longattn.methods.registry import get
from tests.methods.prefill_checks import (
    ORACLE_GRID,
    ORACLE_IDS,
    causal_dense,
    check_density,
    check_keeps_everything,
    check_method_density,
    check_oracle,
    dense_mask_mod,
    qkv,
)
from tests.oracle import assert_close_to_reference


@pytest.mark.parametrize(("Sq", "Skv", "Hkv", "dtype", "D"), ORACLE_GRID, ids=ORACLE_IDS)
def test_oracle_rule_and_density(Sq, Skv, Hkv, dtype, D):
    q, k, v = qkv(Sq, Skv, Hkv=Hkv, D=D, dtype=dtype)
    m = MInferenceVerticalSlash(vertical_size=10, slash_size=20, last_q=32)
    bs = m.estimate(q, k)
    check_oracle(bs, q, k, v)
    check_density(bs, m.last_density)
    assert m.last_density < 1.0


def test_block_granularity_keeps_the_same_blocks():
    q, k, v = qkv(300)
    token = MInferenceVerticalSlash(vertical_size=10, slash_size=20).estimate(q, k)
    whole = MInferenceVerticalSlash(vertical_size=10, slash_size=20, token_level=False).estimate(q, k)
    assert torch.equal(token.block_map()[0] != 0, whole.block_map()[0] != 0)
    assert token.density() == whole.density() and token.mask_density() < whole.mask_density()
    check_oracle(whole, q, k, v)


def test_planted_column_and_diagonal_are_selected():
    S, D, col, diag = 400, 32, 237, 150
    q, k, v = qkv(S, Hq=2, Hkv=2, D=D)
    u = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(3)), dim=0)
    q = q + 3 * u  # every query shares a direction that key `col` carries strongly
    k[:, :, col] = 10 * u
    k[:, :, : S - diag] += 0.5 * q[:, :, diag:]  # key j echoes query j + diag: the diagonal `diag` lights up
    m = MInferenceVerticalSlash(vertical_size=1, slash_size=1, forced_columns=0, forced_diagonals=0)
    dense = m.estimate(q, k).to_dense().cpu()
    i, j = torch.arange(S).view(-1, 1), torch.arange(S).view(1, -1)
    expected = ((j == col) | (i - j == diag)) & causal_dense(S, S)
    assert torch.equal(dense, expected.expand_as(dense))


def test_forced_columns_and_diagonals_are_kept():
    q, k, _ = qkv(300)
    dense = MInferenceVerticalSlash(vertical_size=30, slash_size=100).estimate(q, k).to_dense().cpu()
    i, j = torch.arange(300).view(-1, 1), torch.arange(300).view(1, -1)
    forced = ((j < 30) | (i - j < 100)) & causal_dense(300, 300)
    assert torch.equal(dense, forced.expand_as(dense))  # budgets equal to the forced sets select exactly them


@pytest.mark.parametrize(("Sq", "Skv"), [(300, 300), (70, 300)])
def test_budget_of_the_whole_context_is_dense(Sq, Skv):
    q, k, v = qkv(Sq, Skv)
    check_keeps_everything(MInferenceVerticalSlash(vertical_size=Skv, slash_size=Skv).estimate(q, k), q, k, v)


def test_bad_input():
    q, k, _ = qkv(100)
    assert get("minference_vertical_slash").factory is MInferenceVerticalSlash
    with pytest.raises(ValueError, match="vertical_size: budget of 1000 tokens exceeds the context of 100"):
        MInferenceVerticalSlash(slash_size=10).estimate(q, k)
    with pytest.raises(ValueError, match="slash_size: budget of 101 tokens exceeds"):
        MInferenceVerticalSlash(vertical_size=10, slash_size=101).estimate(q, k)
    for knob in ("vertical_size", "slash_size", "last_q"):
        with pytest.raises(ValueError, match=f"{knob}: expected an int >= 1"):
            MInferenceVerticalSlash(**{knob: 0})
    with pytest.raises(ValueError, match="forced_columns: expected an int >= 0"):
        MInferenceVerticalSlash(forced_columns=-1)


def test_flex_backend_runs_the_token_level_pattern():
    q, k, v = qkv(200)
    bs = MInferenceVerticalSlash(vertical_size=20, slash_size=40).estimate(q, k)
    mod = dense_mask_mod(bs.to_dense())
    ref, _ = reference_attention(q.double(), k.double(), v.double(), mask=mod)
    low, _ = reference_attention(q, k, v, mask=mod, compute_dtype=q.dtype)
    assert_close_to_reference(longattn.attention(q, k, v, mask=bs, impl="flex"), ref, low, what="out (flex)")


@pytest.mark.parametrize("token_level", [None, False])
def test_columns_are_gathered_not_blockized(token_level):
    """Kept columns become gathered columns (not whole blocks); the density counts the pairs computed (recount from
    the element mask), and the Triton kernel (interpreted on CPU) matches the oracle on the estimate."""
    q, k, v = qkv(300, Hq=4, Hkv=2)
    m = MInferenceVerticalSlash(vertical_size=10, slash_size=5, forced_columns=0, forced_diagonals=5,
                                token_level=token_level)
    bs = m.estimate(q, k)
    assert bs.columns is not None and bs.column_counts.tolist() == [[10] * 4]
    check_method_density(m, bs)
    check_oracle(bs, q, k, v, impls=("reference", "gather", "triton"))
    blocks = (bs.block_map()[0] != 0).float().mean()
    assert blocks < 0.5  # only the slash band's blocks: 10 scattered columns no longer keep every block
