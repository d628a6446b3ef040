"""Decode kernel (Triton, interpreted on CPU) against the fp64 decode oracle: dense, varlen, paged and selected
caches, Tq 1 and 4, GQA 1/4/8, odd lengths; the oracle itself against the prefill reference; page selection."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longattn import decode_attention
from longattn.kernels import decode as decode_mod
from longattn.kernels.decode import decode_triton
from longattn.kernels.decode_reference import decode_reference
from longattn.kernels.page_select import page_bounds, page_scores, page_scores_reference, select_pages
from longattn.kernels.reference import reference_attention
from tests.oracle import assert_close_to_reference

HKV = 2


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN (integer buffers as -7), so an unwritten entry fails."""
    def nan_empty(*shape, dtype, device):
        return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)

    monkeypatch.setattr(decode_mod, "_empty", nan_empty)


def _inputs(B, G, Tq, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HKV * G, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, HKV, S, D, generator=g).to(dtype)
    v = torch.randn(B, HKV, S, D, generator=g).to(dtype)
    return q, k, v


def _check(out, lse, q, k, v, **kw):
    """The tolerance rule: error vs fp64 oracle ≤ 2× the oracle's own error in q's precision."""
    ref_o, ref_l = decode_reference(q.double(), k.double(), v.double(), **kw)
    low_o, low_l = decode_reference(q, k, v, compute_dtype=q.dtype, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert_close_to_reference(out, ref_o, low_o, what="out")
    assert_close_to_reference(lse, ref_l, low_l.double(), what="lse")


def _paged(k, v, page_size, seed):
    """Scatter a contiguous cache into shuffled physical pages (plus spare ones): (k_pages, v_pages, block_table)."""
    B, H, S, D = k.shape
    n = math.ceil(S / page_size)
    pad = n * page_size - S
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(B, H, n, page_size, D).permute(0, 2, 1, 3, 4)
    vp = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(B, H, n, page_size, D).permute(0, 2, 1, 3, 4)
    total = B * n + 3
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: B * n]
    k_pages = torch.randn(total, H, page_size, D).to(k.dtype)
    v_pages = torch.randn(total, H, page_size, D).to(k.dtype)
    k_pages[perm] = kp.reshape(B * n, H, page_size, D)
    v_pages[perm] = vp.reshape(B * n, H, page_size, D)
    return k_pages, v_pages, perm.view(B, n).to(torch.int32)


DENSE = [  # (seq, group, Tq, head_dim, dtype)
    (1, 1, 1, 32, torch.float32), (17, 4, 1, 64, torch.float16), (300, 8, 1, 32, torch.float16),
    (1000, 4, 1, 64, torch.float32), (17, 1, 4, 32, torch.float16), (300, 4, 4, 64, torch.float32),
    (1000, 8, 4, 32, torch.float16), (1, 8, 4, 64, torch.float32),
]


@pytest.mark.parametrize("S,G,Tq,D,dtype", DENSE,
                         ids=[f"S{c[0]}-G{c[1]}-Tq{c[2]}-D{c[3]}-{str(c[4])[6:]}" for c in DENSE])
def test_dense_matches_oracle(S, G, Tq, D, dtype):
    q, k, v = _inputs(1, G, Tq, S, D, dtype, seed=S + G)
    out, lse = decode_attention(q, k, v, impl="triton", return_lse=True)
    _check(out, lse, q, k, v)


@pytest.mark.parametrize("splits", [1, 3, 20])
@pytest.mark.parametrize("Tq", [1, 4])
def test_varlen_and_forced_splits(Tq, splits):
    """Per-sequence lengths (one shorter than Tq: its early queries see nothing), split counts that leave
    programs empty, and the single-split direct path."""
    q, k, v = _inputs(3, 4, Tq, 600, 32, torch.float16, seed=Tq)
    lens = torch.tensor([2, 600, 301], dtype=torch.int32)
    out, lse = decode_triton(q, k, v, lens, None, None, None, None, 1 / math.sqrt(32), splits=splits)
    _check(out, lse, q, k, v, cache_seqlens=lens)
    if Tq == 4:
        assert torch.isinf(lse[0, :, :2]).all() and (out[0, :, :2] == 0).all()


@pytest.mark.parametrize("Tq", [1, 3])
def test_lengths_per_kv_head(Tq):
    """cache_seqlens [B, Hkv] (what per-head eviction leaves): each kv head reads its own prefix; the int64 lengths
    of the HF cache go straight to the kernel; one head with nothing yet sees nothing."""
    q, k, v = _inputs(2, 4, Tq, 300, 32, torch.float16, seed=11 + Tq)
    lens = torch.tensor([[300, 17], [0, 161]])
    out, lse = decode_attention(q, k, v, cache_seqlens=lens, impl="triton", return_lse=True)
    _check(out, lse, q, k, v, cache_seqlens=lens)
    direct, _ = decode_triton(q, k, v, lens, None, None, None, None, 1 / math.sqrt(32), splits=4)
    assert torch.equal(direct, out) or _check(direct, lse, q, k, v, cache_seqlens=lens) is None
    assert torch.isinf(lse[1, :4]).all() and (out[1, :4] == 0).all()
    ref_head, _ = decode_reference(q[:1, 4:].double(), k[:1, 1:].double(), v[:1, 1:].double(),
                                   cache_seqlens=torch.tensor([17]))
    assert torch.allclose(out[:1, 4:].double(), ref_head, atol=2e-3)


def test_merge_of_many_splits_and_wide_groups():
    """The merge's running max across merge steps: G·Tq = 32 rows of d = 64 take 4 splits per step; 8 splits of
    128 tokens, the later ones scoring far higher (so the max moves in the second step), and a sequence of 450
    tokens whose last splits see nothing."""
    q, k, v = _inputs(2, 8, 4, 1000, 64, torch.float16, seed=7)
    k[:, :, 512:] *= 3
    lens = torch.tensor([1000, 450], dtype=torch.int32)
    assert decode_mod.MERGE_ELEMENTS // (32 * 64) == 4
    out, lse = decode_triton(q, k, v, lens, None, None, None, None, 0.125, splits=8)
    _check(out, lse, q, k, v, cache_seqlens=lens, scale=0.125)


@pytest.mark.parametrize("batch_heads,n_units,unit,min_tokens,want", [
    (8, 64, 128, 512, 16),     # 8k dense, batch 1: the sweep's best of 16 / 32 / 64
    (8, 256, 128, 512, 32),    # 32k dense, batch 1: best of 32 / 64 / 128 / 256
    (64, 64, 128, 512, 4),     # 8k dense, batch 8: best of 4 / 8 / 16
    (8, 64, 64, 256, 16),      # 4k selected of 128k, batch 1: best of 4 / 8 / 16 / 32 / 64
    (8, 3, 128, 512, 1),       # a short cache: one program per (batch, kv head), no merge
    (512, 4096, 128, 512, 1),  # more (batch, kv head) pairs than the SMs take twice: no split
])
def test_choose_splits(batch_heads, n_units, unit, min_tokens, want):
    """The split counts the H100 sweep measured best (132 SMs), and the split arithmetic: units cover the cache,
    no program is empty, none holds fewer than min_tokens unless the cache is shorter."""
    splits, per = decode_mod.choose_splits(batch_heads, n_units, unit, 132, min_tokens)
    assert splits == want
    assert (splits - 1) * per < n_units <= splits * per
    assert splits == 1 or per * unit >= min_tokens


@pytest.mark.parametrize("page_size,G,Tq,dtype", [(16, 1, 1, torch.float32), (32, 4, 4, torch.float16),
                                                  (64, 8, 1, torch.float16)])
def test_paged_matches_oracle(page_size, G, Tq, dtype):
    q, k, v = _inputs(2, G, Tq, 300, 64, dtype, seed=page_size)
    kp, vp, table = _paged(k, v, page_size, seed=page_size)
    lens = torch.tensor([300, 129], dtype=torch.int32)
    out, lse = decode_attention(q, kp, vp, cache_seqlens=lens, block_table=table, impl="triton", return_lse=True)
    _check(out, lse, q, kp, vp, cache_seqlens=lens, block_table=table)
    # the same tokens in the contiguous layout: the oracle's paging is not what makes this pass
    assert_close_to_reference(out, decode_reference(q.double(), k.double(), v.double(), cache_seqlens=lens)[0],
                              decode_reference(q, k, v, cache_seqlens=lens, compute_dtype=dtype)[0])


def _random_selection(B, n_pages, n_sel, seed, lens=None, page_size=16):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.stack([torch.randperm(n_pages, generator=g)[:n_sel] for _ in range(HKV)])
                       for _ in range(B)])
    counts = torch.randint(0, n_sel + 1, (B, HKV), generator=g)
    counts[0, 0] = 0  # a head that reads nothing: output 0, lse -inf
    counts[-1, -1] = n_sel
    return idx.to(torch.int32), counts.to(torch.int32)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("G,Tq,dtype", [(1, 1, torch.float32), (4, 4, torch.float16), (8, 1, torch.float16)])
def test_selected_pages_match_oracle(paged, G, Tq, dtype):
    page_size, S = 16, 300
    q, k, v = _inputs(2, G, Tq, S, 32, dtype, seed=G + 10 * paged)
    lens = torch.tensor([300, 150], dtype=torch.int32)
    idx, counts = _random_selection(2, math.ceil(S / page_size), 6, seed=G)
    kw = dict(cache_seqlens=lens, page_indices=idx, page_counts=counts)
    if paged:
        k, v, table = _paged(k, v, page_size, seed=G)
        kw["block_table"] = table
    else:
        kw["page_size"] = page_size
    out, lse = decode_attention(q, k, v, impl="triton", return_lse=True, **kw)
    _check(out, lse, q, k, v, **kw)
    assert torch.isinf(lse[0, :G]).all() and (out[0, :G] == 0).all()  # count 0: kv head 0 of batch 0


def test_group_page_union_hand_example():
    """Two kv heads of a group of 3: per-query-head lists → ascending union, counts, membership bits."""
    idx = torch.tensor([[[4, 1, 9], [1, 7, 0], [9, 4, 2],     # kv head 0: heads read {4,1}, {1,7,0}, {9}
                         [5, 6, 7], [6, 5, 8], [3, 3, 3]]],   # kv head 1: {5,6}, {}, {3} (padding repeats)
                       dtype=torch.int32)
    counts = torch.tensor([[2, 3, 1, 2, 0, 1]], dtype=torch.int32)
    for union in (lambda *a: decode_mod.group_page_union(*a, 12), decode_mod.group_page_union_reference):
        pages, n, bits = union(idx, counts, 3)
        assert n.tolist() == [[5, 3]]
        assert pages[0, 0, :5].tolist() == [0, 1, 4, 7, 9]
        assert bits[0, 0, :5].tolist() == [0b010, 0b011, 0b001, 0b010, 0b100]
        assert pages[0, 1, :3].tolist() == [3, 5, 6] and bits[0, 1, :3].tolist() == [0b100, 0b001, 0b001]
    with pytest.raises(ValueError, match="page_indices.*31"):
        decode_mod.group_page_union(torch.zeros(1, 32, 1, dtype=torch.int32), torch.ones(1, 32, dtype=torch.int32),
                                    32, 4)


@settings(max_examples=10)
@given(G=st.integers(1, 8), n=st.integers(1, 40), n_pages=st.integers(1, 2500), seed=st.integers(0, 2**16))
def test_group_page_union_kernel_equals_torch(G, n, n_pages, seed):
    """The one-launch union (bitmap + compaction, pages past 1024 in a second block) equals the sort-based one."""
    g = torch.Generator().manual_seed(seed)
    n = min(n, n_pages)
    idx = torch.rand(2, 3 * G, n_pages, generator=g).argsort(-1)[..., :n].to(torch.int32)
    counts = torch.randint(0, n + 1, (2, 3 * G), generator=g, dtype=torch.int32)
    pages, got_n, bits = decode_mod.group_page_union(idx, counts, G, n_pages)
    ref_pages, ref_n, ref_bits = decode_mod.group_page_union_reference(idx, counts, G)
    assert torch.equal(got_n, ref_n)
    used = torch.arange(pages.shape[-1]) < got_n[..., None]
    assert torch.equal(pages[used], ref_pages[..., : pages.shape[-1]][used])
    assert torch.equal(bits[used], ref_bits[..., : pages.shape[-1]][used])


def _per_query_head_selection(B, Hq, n_pages, n_sel, g, shared=0.5):
    """Distinct pages per query head; a ``shared`` fraction of each group's picks overlap (as real heads do)."""
    base = torch.rand(B, HKV, 1, n_pages, generator=g).expand(-1, -1, Hq // HKV, -1)
    noise = torch.rand(B, HKV, Hq // HKV, n_pages, generator=g)
    idx = (shared * base + (1 - shared) * noise).argsort(-1)[..., :n_sel].reshape(B, Hq, n_sel)
    counts = torch.randint(0, n_sel + 1, (B, Hq), generator=g)
    counts[0, 0] = 0  # a query head that reads nothing: output 0, lse -inf
    return idx.to(torch.int32), counts.to(torch.int32)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("G,Tq,dtype", [(2, 1, torch.float32), (4, 3, torch.float16), (8, 1, torch.float16)])
def test_per_query_head_pages_match_oracle(paged, G, Tq, dtype):
    """One page set per query head (Quest's own form): the kernel reads the group's union, each head its own."""
    page_size, S = 16, 300
    q, k, v = _inputs(2, G, Tq, S, 32, dtype, seed=20 + G)
    g = torch.Generator().manual_seed(G)
    idx, counts = _per_query_head_selection(2, HKV * G, math.ceil(S / page_size), 5, g)
    kw = dict(cache_seqlens=torch.tensor([[300, 211], [150, 97]], dtype=torch.int32), page_indices=idx,
              page_counts=counts)
    if paged:
        k, v, kw["block_table"] = _paged(k, v, page_size, seed=G)
    else:
        kw["page_size"] = page_size
    out, lse = decode_attention(q, k, v, impl="triton", return_lse=True, **kw)
    _check(out, lse, q, k, v, **kw)
    assert torch.isinf(lse[0, 0]).all() and (out[0, 0] == 0).all()  # count 0 for query head 0 only
    assert torch.isfinite(lse[0, 1]).any()


def test_per_query_head_oracle_is_per_head_attention():
    """The oracle with one set per query head equals each head attending alone over its own pages (MHA view)."""
    B, G, S, ps = 1, 4, 200, 16
    q, k, v = _inputs(B, G, 1, S, 32, torch.float64, seed=7)
    g = torch.Generator().manual_seed(7)
    idx, counts = _per_query_head_selection(B, HKV * G, math.ceil(S / ps), 4, g)
    out = decode_reference(q, k, v, page_size=ps, page_indices=idx, page_counts=counts)[0]
    mha_k, mha_v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    for h in range(HKV * G):
        one = decode_reference(q[:, h:h + 1], mha_k[:, h:h + 1], mha_v[:, h:h + 1], page_size=ps,
                               page_indices=idx[:, h:h + 1], page_counts=counts[:, h:h + 1])[0]
        torch.testing.assert_close(out[:, h:h + 1], one, rtol=0, atol=1e-12)


@settings(max_examples=8)
@given(G=st.sampled_from([2, 3, 4]), S=st.integers(1, 200), n_sel=st.integers(1, 6),
       shared=st.sampled_from([0.0, 0.7, 1.0]), splits=st.sampled_from([None, 1, 3]), seed=st.integers(0, 2**16))
def test_random_per_query_head_selections(G, S, n_sel, shared, splits, seed):
    page_size = 16
    q, k, v = _inputs(2, G, 1, S, 32, torch.float32, seed)
    g = torch.Generator().manual_seed(seed)
    n_pages = math.ceil(S / page_size)
    idx, counts = _per_query_head_selection(2, HKV * G, n_pages, min(n_sel, n_pages), g, shared)
    lens = torch.randint(0, S + 1, (2,), generator=g, dtype=torch.int32)
    out, lse = decode_triton(q, k, v, lens, None, page_size, idx, counts, 32 ** -0.5, splits=splits)
    _check(out, lse, q, k, v, cache_seqlens=lens, page_size=page_size, page_indices=idx, page_counts=counts)


@pytest.mark.parametrize("page_size", [1, 4, 8])
@pytest.mark.parametrize("mode", ["paged", "selected", "per_query_head"])
@pytest.mark.parametrize("splits", [None, 1, 3, 7])
def test_pages_smaller_than_a_tile(page_size, mode, splits):
    """Pages under 16 tokens (Quest's 8) are gathered whole into a tile; a split boundary may fall inside a tile
    (3 or 7 splits of an odd page count), whose columns belong to the neighbour and must not be read twice."""
    G, S = 4, 131
    q, k, v = _inputs(2, G, 1, S, 32, torch.float16, seed=page_size)
    g = torch.Generator().manual_seed(page_size + len(mode))
    n_pages = math.ceil(S / page_size)
    kw = {"cache_seqlens": torch.tensor([[131, 77], [50, 1]], dtype=torch.int32)}
    if mode == "paged":
        kp, vp, table = _paged(k, v, page_size, seed=page_size)
        out, lse = decode_triton(q, kp, vp, kw["cache_seqlens"], table, page_size, None, None, 32 ** -0.5,
                                 splits=splits)
        _check(out, lse, q, kp, vp, block_table=table, **kw)
        return
    if mode == "selected":
        idx, counts = _random_selection(2, n_pages, min(9, n_pages), seed=page_size)
    else:
        idx, counts = _per_query_head_selection(2, HKV * G, n_pages, min(9, n_pages), g)
    kw.update(page_size=page_size, page_indices=idx, page_counts=counts)
    out, lse = decode_triton(q, k, v, kw["cache_seqlens"], None, page_size, idx, counts, 32 ** -0.5, splits=splits)
    _check(out, lse, q, k, v, **kw)


def test_strided_cache_views():
    """A cache stored token-major ([B, S, Hkv, D], viewed as [B, Hkv, S, D]) and a non-contiguous q."""
    q, k, v = _inputs(2, 4, 2, 130, 32, torch.float16, seed=4)
    kt, vt = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)
    assert not kt.is_contiguous() and not qt.is_contiguous()
    out, lse = decode_attention(qt, kt, vt, impl="triton", return_lse=True)
    _check(out, lse, q, k, v)


def test_selection_padding_is_never_read():
    """Entries of page_indices past page_counts may hold anything (-1 here): not validated, not read."""
    q, k, v = _inputs(1, 4, 1, 100, 32, torch.float32, seed=3)
    idx = torch.tensor([[[2, 0, -1, -1], [6, -1, -1, -1]]], dtype=torch.int32)
    counts = torch.tensor([[2, 1]], dtype=torch.int32)
    kw = dict(page_size=16, page_indices=idx, page_counts=counts)
    out, lse = decode_attention(q, k, v, impl="triton", return_lse=True, **kw)
    _check(out, lse, q, k, v, **kw)


@settings(max_examples=8)
@given(B=st.integers(1, 2), G=st.sampled_from([1, 2, 4]), Tq=st.integers(1, 3), S=st.integers(1, 200),
       page_size=st.sampled_from([16, 32]), mode=st.sampled_from(["dense", "paged", "selected"]),
       seed=st.integers(0, 2**16))
def test_random_layouts_match_oracle(B, G, Tq, S, page_size, mode, seed):
    q, k, v = _inputs(B, G, Tq, S, 32, torch.float32, seed)
    g = torch.Generator().manual_seed(seed)
    kw = {"cache_seqlens": torch.randint(0, S + 1, (B,), generator=g, dtype=torch.int32)}
    if mode == "paged":
        k, v, kw["block_table"] = _paged(k, v, page_size, seed)
    elif mode == "selected":
        n_pages = math.ceil(S / page_size)
        n_sel = min(3, n_pages)
        idx = torch.rand(B, HKV, n_pages, generator=g).argsort(-1)[..., :n_sel]  # distinct pages, random order
        kw.update(page_size=page_size, page_indices=idx.to(torch.int32),
                  page_counts=torch.randint(0, n_sel + 1, (B, HKV), generator=g, dtype=torch.int32))
    out, lse = decode_attention(q, k, v, impl="triton", return_lse=True, **kw)
    _check(out, lse, q, k, v, **kw)


def test_oracle_matches_prefill_reference():
    """The decode oracle on a full dense cache equals bottom-right causal attention of the prefill oracle."""
    q, k, v = _inputs(2, 4, 3, 77, 32, torch.float64, seed=0)
    out, lse = decode_reference(q, k, v)
    ref, ref_lse = reference_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)


def test_selection_of_all_pages_equals_dense():
    q, k, v = _inputs(1, 4, 2, 100, 32, torch.float64, seed=1)
    idx = torch.arange(7, dtype=torch.int32).flip(0).expand(1, HKV, 7).contiguous()  # order must not matter
    counts = torch.full((1, HKV), 7, dtype=torch.int32)
    sel = decode_reference(q, k, v, page_size=16, page_indices=idx, page_counts=counts)
    torch.testing.assert_close(sel, decode_reference(q, k, v), rtol=0, atol=1e-12)


def test_auto_on_cpu_is_the_reference():
    q, k, v = _inputs(1, 4, 1, 50, 32, torch.float32, seed=2)
    out, lse = decode_attention(q, k, v, return_lse=True)
    ref_o, ref_l = decode_reference(q, k, v)
    assert torch.equal(out, ref_o) and torch.equal(lse, ref_l)


@pytest.mark.parametrize("reduce", ["max", "sum", "none"])
@pytest.mark.parametrize("G,Tq,D", [(1, 1, 32), (4, 2, 64), (8, 1, 32)])
def test_page_scores_match_torch(reduce, G, Tq, D):
    g = torch.Generator().manual_seed(G)
    q = torch.randn(2, HKV * G, Tq, D, generator=g)
    k = torch.randn(2, HKV, 200, D, generator=g)
    mn, mx = page_bounds(k, 16, cache_seqlens=torch.tensor([200, 37]))
    got = page_scores(q, mn, mx, reduce=reduce, impl="triton")
    want = page_scores_reference(q, mn, mx, reduce)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # the bound really bounds: every token's score is at most its page's score (max over the group)
    if reduce == "max":
        s = torch.einsum("bhtd,bksd->bhts", q.double(), k.double()).view(2, HKV, G * Tq, 200)
        per_page = torch.nn.functional.pad(s, (0, 8), value=-1e9).view(2, HKV, G * Tq, 13, 16).amax((2, 4))
        assert (per_page[1, :, :3] <= got[1, :, :3] + 1e-4).all() and (per_page[0] <= got[0] + 1e-4).all()
    if reduce == "none":  # one row per (query head, query token), in that order; the group's max is their max
        assert got.shape == (2, HKV * G * Tq, 13)
        grouped = page_scores(q, mn, mx, reduce="max", impl="triton")
        torch.testing.assert_close(got.view(2, HKV, G * Tq, 13).amax(2), grouped, rtol=0, atol=0)


def test_page_bounds_paged_equals_contiguous():
    k = torch.randn(2, HKV, 100, 32)
    lens = torch.tensor([100, 40])
    kp, _, table = _paged(k, k, 32, seed=3)
    for a, b in zip(page_bounds(k, 32, cache_seqlens=lens), page_bounds(kp, 32, cache_seqlens=lens, block_table=table),
                    strict=True):
        assert torch.equal(a, b)
    lo, hi = page_bounds(k, 32, cache_seqlens=lens)
    assert torch.equal(lo[1, :, 1], k[1, :, 32:40].amin(1)) and torch.equal(hi[1, :, 3], torch.zeros(HKV, 32))


def test_select_pages_keeps_sinks_recent_and_top_scores():
    scores = torch.randn(2, HKV, 20)
    lens = torch.tensor([320, 100])  # 20 and 7 valid pages of 16
    idx, counts = select_pages(scores, 96, 16, cache_seqlens=lens)  # 6 pages
    assert idx.dtype == torch.int32 and counts.tolist() == [[6, 6], [6, 6]]
    for b, n_valid in ((0, 20), (1, 7)):
        for h in range(HKV):
            chosen = idx[b, h, : counts[b, h]].tolist()
            assert chosen == sorted(chosen) and 0 in chosen and n_valid - 1 in chosen
            rest = sorted(range(1, n_valid - 1), key=lambda p, b=b, h=h: -float(scores[b, h, p]))[:4]
            assert set(chosen) == {0, n_valid - 1, *rest}
    few = torch.tensor([320, 40])  # 3 valid pages < 6 selected: the count says so
    idx, counts = select_pages(scores, 96, 16, cache_seqlens=few)
    assert counts[1].tolist() == [3, 3] and idx[1, :, :3].tolist() == [[0, 1, 2]] * HKV


def test_select_then_decode_end_to_end():
    """Quest pipeline: bounds → scores → pages → kernel, checked against the oracle on the same selection."""
    q, k, v = _inputs(1, 4, 1, 500, 32, torch.float16, seed=5)
    mn, mx = page_bounds(k, 32)
    idx, counts = select_pages(page_scores(q, mn, mx, impl="triton"), 160, 32)
    kw = dict(page_size=32, page_indices=idx, page_counts=counts)
    out, lse = decode_attention(q, k, v, impl="triton", return_lse=True, **kw)
    _check(out, lse, q, k, v, **kw)


def _err(fn, exc, *words):
    with pytest.raises(exc) as e:
        fn()
    for w in words:
        assert w in str(e.value), str(e.value)


def test_bad_inputs_raise_clear_errors():
    q, k, v = _inputs(2, 4, 1, 64, 32, torch.float32, seed=0)
    lens = torch.tensor([64, 10], dtype=torch.int32)
    idx = torch.zeros(2, HKV, 2, dtype=torch.int32)
    cnt = torch.ones(2, HKV, dtype=torch.int32)
    _err(lambda: decode_attention(q, k, v, page_size=24, page_indices=idx, page_counts=cnt), ValueError,
         "page_size", "24", "power of two")
    _err(lambda: decode_attention(q, k, v, page_indices=idx, page_counts=cnt), ValueError, "page_size")
    _err(lambda: decode_attention(q, k, v, page_size=16, page_indices=idx), ValueError, "page_counts")
    _err(lambda: decode_attention(q, k, v, page_size=16, page_indices=idx + 4, page_counts=cnt), ValueError,
         "page_indices", "[0, 3]")
    _err(lambda: decode_attention(q, k, v, page_size=16, page_indices=idx, page_counts=cnt + 2), ValueError,
         "page_counts", "[0, 2]")
    _err(lambda: decode_attention(q, k, v, cache_seqlens=lens + 60), ValueError, "cache_seqlens", "[0, 64]")
    dup = torch.tensor([[[1, 1], [0, 1]], [[2, 3], [3, 3]]], dtype=torch.int32)
    _err(lambda: decode_attention(q, k, v, page_size=16, page_indices=dup, page_counts=cnt * 2), ValueError,
         "page_indices", "twice")
    decode_attention(q, k, v, page_size=16, page_indices=dup, page_counts=cnt)  # duplicates past the count: fine
    _err(lambda: decode_attention(q, k, v, page_size=16, page_indices=torch.zeros(2, 3, 2, dtype=torch.int32),
                                  page_counts=cnt), ValueError, "page_indices", "Hkv=2", "Hq=8")
    _err(lambda: decode_attention(q, k, v, page_size=16, page_indices=torch.zeros(2, 8, 2, dtype=torch.int32),
                                  page_counts=cnt), ValueError, "page_counts", "(2, 8)")
    _err(lambda: decode_attention(q, k, v, cache_seqlens=lens.float()), TypeError, "cache_seqlens", "int32")
    _err(lambda: decode_attention(q, k, v, cache_seqlens=lens.view(2, 1)), ValueError, "cache_seqlens", "(2,)")
    _err(lambda: decode_attention(q, k, v, cache_seqlens=lens.view(2, 1).expand(2, HKV) + 60), ValueError,
         "cache_seqlens", "[0, 64]")
    _err(lambda: decode_attention(q, k[:, :1].expand(2, 3, 64, 32), v[:, :1].expand(2, 3, 64, 32)), ValueError,
         "GQA")
    _err(lambda: decode_attention(q, k.half(), v.half()), TypeError, "dtype")
    _err(lambda: decode_attention(q, k, v[:, :, :10]), ValueError, "v_cache", "shape")
    _err(lambda: decode_attention(q[:, :, :0], k, v), ValueError, "q", "at least 1")
    _err(lambda: decode_attention(q, k, v, impl="flash"), ValueError, "impl", "flash")
    kp, vp, table = _paged(k, v, 16, seed=0)
    _err(lambda: decode_attention(q, kp, vp, block_table=table, page_size=32), ValueError, "page_size", "16")
    _err(lambda: decode_attention(q, kp, vp, block_table=table + 100), ValueError, "block_table")
    scores = torch.randn(2, HKV, 4)
    _err(lambda: select_pages(scores, 0, 16), ValueError, "budget_tokens", "0")
    _err(lambda: select_pages(scores, -5, 16), ValueError, "budget_tokens")
    _err(lambda: select_pages(scores, 65, 16), ValueError, "budget_tokens", "64")
    _err(lambda: select_pages(scores, 16, 16), ValueError, "budget_tokens", "always")
    _err(lambda: select_pages(scores, 32, 12), ValueError, "page_size", "12")
    _err(lambda: page_bounds(k, 10), ValueError, "page_size", "10")
    mn, mx = page_bounds(k, 16)
    _err(lambda: page_scores(q, mn, mx, reduce="mean"), ValueError, "reduce")
    _err(lambda: page_scores(q[:1], mn, mx), ValueError, "page_min")
