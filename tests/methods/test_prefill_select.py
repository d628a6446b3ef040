"""The shared selection helpers against brute force: token-level columns / diagonals give exactly the right
blocks, elements and density; cumulative and top-k masks keep what they promise."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from longattn.methods.prefill import _select
from tests.methods.prefill_checks import causal_dense


@st.composite
def _patterns(draw):
    Skv = draw(st.integers(1, 200))
    Sq = draw(st.integers(1, Skv))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    block = draw(st.sampled_from([32, 64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    p_col, p_diag = draw(st.sampled_from([0.0, 0.02, 0.3])), draw(st.sampled_from([0.0, 0.02, 0.3]))
    cols = torch.rand(B, H, Skv, generator=g) < p_col
    diags = torch.rand(B, H, Skv, generator=g) < p_diag
    return Sq, Skv, (block, block), cols, diags


def _brute(Sq, Skv, cols, diags):
    i, j = torch.arange(Skv - Sq, Skv).view(-1, 1), torch.arange(Skv).view(1, -1)
    on = cols[..., None, :] | diags[..., (i - j).clamp(min=0)]
    return on & causal_dense(Sq, Skv)


@given(_patterns())
def test_token_level_build_matches_brute_force(case):
    Sq, Skv, block, cols, diags = case
    expected = _brute(Sq, Skv, cols, diags)
    n_q, n_kv = -(-Sq // block[0]), -(-Skv // block[1])
    padded = torch.nn.functional.pad(expected, (0, n_kv * block[1] - Skv, 0, n_q * block[0] - Sq))
    blocks = padded.view(*expected.shape[:2], n_q, block[0], n_kv, block[1]).any(-1).any(-2)
    assert torch.equal(_select.token_blocks(cols, diags, Sq, Skv, block), blocks)
    on_or_acausal = torch.nn.functional.pad(expected | ~causal_dense(Sq, Skv), (0, n_kv * block[1] - Skv, 0,
                                            n_q * block[0] - Sq), value=True)
    whole = on_or_acausal.view(*expected.shape[:2], n_q, block[0], n_kv, block[1]).all(-1).all(-2)
    assert not (_select.token_covered_blocks(cols, diags, Sq, Skv, block) & ~whole).any()
    every = torch.ones(*cols.shape[:2], n_q, n_kv, dtype=torch.bool)
    bs = _select.build(every, Sq, Skv, block, columns=cols, diagonals=diags, token_level=True)
    assert torch.equal(bs.to_dense(), expected)
    whole = _select.build(every, Sq, Skv, block, columns=cols, diagonals=diags, token_level=False)
    assert whole.density() == bs.density() and not (expected & ~whole.to_dense()).any()


def test_last_q_scores_sum_columns_and_diagonals():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 50, 8, generator=g), torch.randn(1, 1, 90, 8, generator=g)
    p = _select.last_q_attention(q, k, 7)
    assert p.shape == (1, 2, 7, 90) and torch.allclose(p.sum(-1), torch.ones(1, 2, 7))
    vertical, slash = _select.vertical_slash_scores(p)
    i, j = torch.arange(83, 90).view(-1, 1), torch.arange(90).view(1, -1)
    brute = torch.zeros(1, 2, 90)
    for d in range(90):
        brute[..., d] = (p * ((i - j) == d)).sum((-1, -2))
    assert torch.allclose(slash, brute) and torch.allclose(vertical, p.sum(2))
    assert (p * (j > i)).abs().max() == 0  # causal: the last queries see nothing after themselves


def test_topk_and_cumulative_masks():
    s = torch.tensor([[3.0, 1.0, 2.0, 0.5]])
    assert _select.topk_mask(s, 2).tolist() == [[True, False, True, False]]
    assert _select.cumulative_mask(s, 0.45).tolist() == [[True, False, False, False]]  # 3 / 6.5 = 0.46
    assert _select.cumulative_mask(s, 0.5).tolist() == [[True, False, True, False]]


def test_covered_blocks_of_sinks_and_window_need_no_tiles():
    pos = torch.arange(300)
    cols, diags = (pos < 64).view(1, 1, -1), (pos < 128).view(1, 1, -1)
    covered = _select.token_covered_blocks(cols, diags, 300, 300, (64, 64))[0, 0]
    assert covered[:, 0].all()  # the sink block, for every query block
    assert covered.diagonal().all() and covered.diagonal(-1).all()  # windows of 128 cover two block diagonals
    assert not covered[3:, 1].any()  # block 1 is outside both for query blocks 3 and 4
