"""HiP: hierarchical top-k keeps k blocks per query block, finds a planted hot region, oracle rule, density,
whole-context budget is dense, bad knobs."""

from __future__ import annotations

import itertools

import pytest
import torch

from longattn.masks.block_sparse import EMPTY
from longattn.methods.prefill import hip
from longattn.methods.prefill._blocks import geometry
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
    m = HiP(top_k=64, window=64)
    bs = m.estimate(q, k)
    check_oracle(bs, q, k, v)
    check_density(bs, m.last_density)


@pytest.mark.parametrize(("Sq", "Skv", "top_k"), [(1000, 1000, 96), (300, 1000, 160), (127, 127, 32)])
def test_every_query_block_keeps_k_blocks_plus_its_diagonal(Sq, Skv, top_k):
    """Without sinks and window: the k searched blocks plus every kv block holding one of the block's own keys
    (two when the query block straddles kv blocks, as with Sq=300 of Skv=1000)."""
    q, k, _ = qkv(Sq, Skv)
    block = (32, 32)
    selected = HiP(top_k=top_k, block_q=32, sink_tokens=0, window=0).estimate(q, k).block_map()[0].cpu() != EMPTY
    geo = geometry(Sq, Skv, block, "cpu")
    diag = geo.diagonal()
    reach = (geo.q_last // 32 + 1).view(1, 1, -1)
    kept = selected.sum(-1)
    k_blocks = top_k // 32
    lo = torch.minimum(reach, torch.tensor(k_blocks))
    hi = torch.minimum(reach, k_blocks + diag.sum(-1).view(1, 1, -1))
    assert ((kept >= lo) & (kept <= hi)).all()
    assert torch.equal(selected & diag, diag.expand_as(selected))


@pytest.mark.parametrize(("Sq", "Skv", "sinks", "window"), [(1000, 1000, 16, 256), (300, 1000, 40, 100)])
def test_sinks_and_window_blocks_are_always_kept(Sq, Skv, sinks, window):
    """The key blocks holding the first ``sink_tokens`` tokens and each query block's window are kept (causal)."""
    q, k, _ = qkv(Sq, Skv)
    selected = HiP(top_k=64, block_q=64, sink_tokens=sinks, window=window).estimate(q, k).block_map()[0].cpu() != EMPTY
    geo = geometry(Sq, Skv, (64, 32), "cpu")
    sink = (geo.kv_first < sinks).view(1, -1) & geo.reachable()
    win = geo.window(torch.tensor(window)) | geo.diagonal()
    assert (selected >= (sink | win)).all()


@pytest.mark.parametrize(("Sq", "Skv", "sinks", "window", "top_k"),
                         [(1000, 1000, 32, 128, 64), (300, 1000, 40, 100, 96), (1000, 1000, 0, 0, 128)])
def test_top_k_budget_is_spent_outside_sinks_and_window(Sq, Skv, sinks, window, top_k):
    """As in the release, the searched blocks never overlap the kept sink and window blocks: each query block
    keeps its sink and window blocks plus min(k, blocks between them) more."""
    q, k, _ = qkv(Sq, Skv)
    block = (64, 32)
    selected = HiP(top_k=top_k, block_q=64, sink_tokens=sinks, window=window).estimate(q, k).block_map()[0].cpu()
    selected = selected != EMPTY
    geo = geometry(Sq, Skv, block, "cpu")
    n_sinks = -(-sinks // 32)
    fixed = ((geo.kv_first < sinks).view(1, -1) & geo.reachable()) | geo.window(torch.tensor(max(window, 1)))
    fixed |= geo.diagonal()
    first = (geo.q_first - max(window, 1) + 1).clamp(min=0) // 32  # first window block of each query block
    between = (first - n_sinks).clamp(min=0)
    want = fixed.sum(-1) + torch.minimum(between, torch.tensor(top_k // 32))
    assert torch.equal(selected.sum(-1), want.view(1, 1, -1).expand_as(selected.sum(-1)))
    assert (selected >= fixed).all()


def test_planted_hot_region_is_found():
    S, D = 1024, 32
    q, k, _ = qkv(S, Hq=2, Hkv=2, D=D)
    u = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(7)), dim=0).to(q.device)
    q[:, :, -32:] += 3 * u
    k[:, :, 256:512] += 3 * u  # a smooth hot region of 8 key blocks, far from the last query block
    selected = HiP(top_k=64, block_q=32, sink_tokens=0, window=0).estimate(q, k).block_map()[0][0, :, -1] != EMPTY
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
    with pytest.raises(ValueError, match="window: expected an int >= 0"):
        HiP(window=-1)
    with pytest.raises(ValueError, match="sink_tokens: budget of 400 tokens exceeds the context of 300 tokens"):
        HiP(top_k=64, sink_tokens=400).estimate(q, k)


def _halving_reference(qp, kp, reach, k, start):
    """The search scored on the fly: each half's first pooled key against the pooled query (sorted picks)."""
    out = torch.full((*qp.shape[:3], k), -1, dtype=torch.long)
    for b, h, i in itertools.product(*(range(n) for n in qp.shape[:3])):
        lo = int(start[i])
        n = max(int(reach[i]) - lo, 0)
        chunks = [(lo + j * n // k, lo + (j + 1) * n // k) for j in range(k)]
        while any(e - s > 1 for s, e in chunks):
            halves = [(s, (s + e + 1) // 2) for s, e in chunks] + [((s + e + 1) // 2, e) for s, e in chunks]
            score = torch.stack([kp[b, h, min(s, kp.shape[2] - 1)] @ qp[b, h, i] if e > s
                                 else torch.tensor(float("-inf"), dtype=qp.dtype) for s, e in halves])
            chunks = [halves[t] for t in score.topk(k).indices.tolist()]
        picks = sorted(s for s, e in chunks if e > s)
        out[b, h, i, : len(picks)] = torch.tensor(picks, dtype=torch.long)
    return out


@pytest.mark.parametrize(("nq", "nk", "k", "chunk"), [(9, 40, 4, 1 << 27), (9, 40, 4, 3 * 40), (5, 7, 6, 40)])
def test_hierarchical_topk_equals_the_search_scored_on_the_fly(nq, nk, k, chunk, monkeypatch):
    """Scores gathered from the pooled score matrix (in query-block slices) pick what scoring each half's
    representative key directly picks (fp64, so no near-ties)."""
    monkeypatch.setattr(hip, "_SCORE_CHUNK_BYTES", chunk * 8)
    g = torch.Generator().manual_seed(11)
    qp, kp = torch.randn(2, 3, nq, 16, generator=g, dtype=torch.float64), torch.randn(2, 3, nk, 16, generator=g,
                                                                                     dtype=torch.float64)
    reach = torch.linspace(1, nk, nq).long()
    start = reach // 4
    got = hip.hierarchical_topk(qp, kp, reach, k, start)
    got = torch.where(got < 0, nk, got).sort(-1).values
    want = _halving_reference(qp, kp, reach, k, start)
    assert torch.equal(got, torch.where(want < 0, nk, want).sort(-1).values)
