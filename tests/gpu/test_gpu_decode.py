"""The decode kernel at GPU sizes (bf16/fp16, head_dim 128, caches to 128k; dense, varlen, paged, selected, CUDA
graph capture) against the fp64 decode oracle under the suite's tolerance rule (skipped without CUDA)."""

from __future__ import annotations

import math

import pytest
import torch

from longattn import decode_attention
from longattn.kernels.decode_reference import decode_reference
from longattn.kernels.page_select import page_bounds, page_scores, page_scores_reference, select_pages
from tests.oracle import assert_close_to_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DTYPES = [torch.bfloat16, torch.float16]


def _inputs(B, Hq, Hkv, Tq, S, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, generator=g)
    return q, k, v


def _check(out, lse, q, k, v, **kw):
    ref_o, ref_l = decode_reference(q.double(), k.double(), v.double(), **kw)
    low_o, low_l = decode_reference(q, k, v, compute_dtype=q.dtype, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close_to_reference(out, ref_o, low_o, what="out")
    assert_close_to_reference(lse, ref_l, low_l.double(), what="lse")


def _check_selected(q, k, v, page_size, paged, **kw):
    """Run a page selection on the contiguous cache or a paged copy of it and check it against the oracle; returns
    (out, k, v, kwargs) as the kernel read them."""
    if paged:
        k, v, kw["block_table"] = _paged(k, v, page_size)
    else:
        kw["page_size"] = page_size
    out, lse = decode_attention(q, k, v, impl="triton", return_lse=True, **kw)
    _check(out, lse, q, k, v, **kw)
    return out, k, v, kw


def _paged(k, v, page_size, seed=0):
    B, H, S, D = k.shape
    n = math.ceil(S / page_size)
    pad = n * page_size - S
    total = B * n + 5
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: B * n].cuda()
    pages = []
    for t in (k, v):
        tp = torch.nn.functional.pad(t, (0, 0, 0, pad)).view(B, H, n, page_size, D).permute(0, 2, 1, 3, 4)
        store = torch.randn(total, H, page_size, D, device="cuda", dtype=t.dtype)
        store[perm] = tp.reshape(B * n, H, page_size, D)
        pages.append(store)
    return pages[0], pages[1], perm.view(B, n).to(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Tq", [1, 4])
def test_lengths_per_kv_head(Tq, dtype):
    """cache_seqlens [B, Hkv] (per-head eviction in the HF cache): odd, unequal lengths up to 40k, one empty head."""
    q, k, v = _inputs(2, 32, 8, Tq, 40_000, 128, dtype, seed=Tq)
    lens = torch.randint(1, 40_001, (2, 8), generator=torch.Generator().manual_seed(Tq)).cuda()
    lens[1, 3] = 0
    out, lse = decode_attention(q, k, v, cache_seqlens=lens, impl="triton", return_lse=True)
    _check(out, lse, q, k, v, cache_seqlens=lens)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("S,Hq,Hkv,Tq", [(1, 8, 8, 1), (1000, 32, 8, 1), (4097, 32, 4, 4), (33_000, 32, 8, 1),
                                         (131_072, 32, 8, 1), (131_071, 8, 1, 4)],
                         ids=lambda x: str(x))
def test_dense(S, Hq, Hkv, Tq, dtype):
    q, k, v = _inputs(1, Hq, Hkv, Tq, S, 128, dtype, seed=S)
    out, lse = decode_attention(q, k, v, impl="triton", return_lse=True)
    _check(out, lse, q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_batch(dtype):
    q, k, v = _inputs(4, 32, 8, 2, 20_000, 128, dtype)
    lens = torch.tensor([1, 20_000, 777, 12_345], dtype=torch.int32, device="cuda")
    out, lse = decode_attention(q, k, v, cache_seqlens=lens, impl="triton", return_lse=True)
    _check(out, lse, q, k, v, cache_seqlens=lens)


def test_fp32_inputs():
    q, k, v = _inputs(2, 8, 2, 1, 3000, 64, torch.float32)
    out, lse = decode_attention(q, k, v, impl="triton", return_lse=True)
    _check(out, lse, q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [16, 64, 256])
def test_paged(page_size, dtype):
    q, k, v = _inputs(2, 32, 8, 1, 50_000, 128, dtype, seed=page_size)
    kp, vp, table = _paged(k, v, page_size, seed=page_size)
    lens = torch.tensor([50_000, 30_001], dtype=torch.int32, device="cuda")
    out, lse = decode_attention(q, kp, vp, cache_seqlens=lens, block_table=table, impl="triton", return_lse=True)
    _check(out, lse, q, kp, vp, cache_seqlens=lens, block_table=table)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("Tq", [1, 4])
def test_selected_4k_of_128k(Tq, paged, dtype):
    """Quest pipeline at 128k with a 4k-token budget (64 pages of 64): scores in Triton, the kernel vs oracle."""
    S, ps = 131_072, 64
    q, k, v = _inputs(1, 32, 8, Tq, S, 128, dtype, seed=Tq)
    mn, mx = page_bounds(k, ps)
    scores = page_scores(q, mn, mx)
    torch.testing.assert_close(scores, page_scores_reference(q, mn, mx), rtol=1e-3, atol=1e-2)
    idx, counts = select_pages(scores, 4096, ps)
    _check_selected(q, k, v, ps, paged, page_indices=idx, page_counts=counts)


def test_graph_capture_replays_the_same_result():
    """A decode step captured in a CUDA graph (value checks are skipped while capturing) replays correctly, replay
    after replay, reading the lengths at each replay."""
    q, k, v = _inputs(1, 32, 8, 1, 8192, 128, torch.bfloat16)
    lens = torch.tensor([5000], dtype=torch.int32, device="cuda")
    want = decode_attention(q, k, v, cache_seqlens=lens, impl="triton")  # warm-up: autotune + compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = decode_attention(q, k, v, cache_seqlens=lens, impl="triton")
    for n in (8000, 3000, 8000):  # the graph reads the new length at replay
        lens.fill_(n)
        graph.replay()
        torch.testing.assert_close(got, decode_attention(q, k, v, cache_seqlens=lens, impl="triton"), rtol=0, atol=0)
    assert not torch.equal(got, want)


def test_programmatic_dependent_launch_matches_plain_launch(monkeypatch):
    """The merge launched early (PDL, waiting on griddepcontrol) gives bit-identical results to a plain launch."""
    q, k, v = _inputs(2, 32, 8, 1, 70_000, 128, torch.bfloat16)
    lens = torch.tensor([70_000, 9_999], dtype=torch.int32, device="cuda")
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("LONGATTN_DECODE_PDL", flag)
        results.append(decode_attention(q, k, v, cache_seqlens=lens, impl="triton", return_lse=True))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    _check(*results[0], q, k, v, cache_seqlens=lens)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_per_query_head_selection_at_32k(paged, dtype):
    """Quest's own form at GPU sizes: 32 query heads each pick 2k tokens of a 32k cache by their own bound; the
    kernel reads each group's union once (graph-captured too) and matches the oracle head by head."""
    S, ps = 32_768, 64
    q, k, v = _inputs(2, 32, 8, 1, S, 128, dtype, seed=3)
    lens = torch.tensor([S, 20_001], dtype=torch.int32, device="cuda")
    mn, mx = page_bounds(k, ps)
    scores = page_scores(q, mn, mx, reduce="none")  # one row per query head
    idx, counts = select_pages(scores, 2048, ps, cache_seqlens=lens)
    out, k, v, kw = _check_selected(q, k, v, ps, paged, cache_seqlens=lens, page_indices=idx, page_counts=counts)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = decode_attention(q, k, v, impl="triton", **kw)
    graph.replay()
    torch.testing.assert_close(replayed, out, rtol=0, atol=0)


def test_read_ceiling_reads_every_byte():
    """The bench's bandwidth yardstick really loads all of K and V (its sums add up to theirs)."""
    from longattn.bench.read_ceiling import read_kv

    _, k, v = _inputs(1, 8, 8, 1, 8191, 128, torch.bfloat16)
    torch.testing.assert_close(read_kv(k, v).sum(), k.float().sum() + v.float().sum(), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["paged", "selected", "per_query_head"])
def test_eight_token_pages(mode, dtype):
    """Quest's small pages at GPU sizes: 8-token pages gathered whole into the autotuned tiles (paged cache, a
    per-kv-head and a per-query-head 2k-token selection of a 20k cache)."""
    S, ps = 20_000, 8
    q, k, v = _inputs(2, 32, 8, 1, S, 128, dtype, seed=4)
    lens = torch.tensor([S, 12_345], dtype=torch.int32, device="cuda")
    if mode == "paged":
        kp, vp, table = _paged(k, v, ps)
        out, lse = decode_attention(q, kp, vp, cache_seqlens=lens, block_table=table, impl="triton", return_lse=True)
        _check(out, lse, q, kp, vp, cache_seqlens=lens, block_table=table)
        return
    mn, mx = page_bounds(k, ps)
    scores = page_scores(q, mn, mx, reduce="none" if mode == "per_query_head" else "max")
    idx, counts = select_pages(scores, 2048, ps, cache_seqlens=lens)
    kw = dict(cache_seqlens=lens, page_size=ps, page_indices=idx, page_counts=counts)
    out, lse = decode_attention(q, k, v, impl="triton", return_lse=True, **kw)
    _check(out, lse, q, k, v, **kw)
