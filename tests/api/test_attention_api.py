"""The public ``longattn.attention`` on CPU: every backend against the fp64 oracle, dispatch and validation.

Triton runs interpreted here (tests/conftest.py sets TRITON_INTERPRET=1) and "flex" runs eagerly, so shapes stay
small. Tolerances follow the one rule of tests/oracle.py.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

import longattn
import longattn.api as api  # noqa: E402
from longattn import BlockSparse, masks
from longattn.kernels.reference import reference_attention
from tests.oracle import assert_close_to_reference, check_against_oracle

FAST_DTYPES = (torch.float16, torch.float32)


def _inputs(B, Hq, Hkv, Sq, Skv, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, s: torch.randn(B, h, s, D, generator=g).to(dtype)  # noqa: E731
    return mk(Hq, Sq), mk(Hkv, Skv), mk(Hkv, Skv)


def _low_rank(B, H, Sq, Skv, r, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    u = (torch.randn(B, H, Sq, r, generator=g) * 0.5).to(dtype)
    w = (torch.randn(B, H, Skv, r, generator=g) * 0.5).to(dtype)
    return u, w


def _api(impl, **kwargs):
    """A ``run(q, k, v, bias) -> (out, lse)`` for check_against_oracle through the public entry point."""

    def run(q, k, v, bias):
        return longattn.attention(q, k, v, impl=impl, return_lse=True, bias=bias, **kwargs)

    return run


def _assert_out_matches_oracle(out, q, k, v, **ref_kwargs):
    """Forward-only oracle rule for paths without an LSE (SDPA): fp64 reference, same-precision baseline."""
    ref, _ = reference_attention(*(t.double() for t in (q, k, v)), compute_dtype=torch.float64, **ref_kwargs)
    low, _ = reference_attention(q, k, v, compute_dtype=q.dtype, **ref_kwargs)
    assert_close_to_reference(out, ref, low)


# ------------------------------------------------------------------------------------------ sdpa vs reference
SDPA_SHAPES = [  # (B, Hq, Hkv, Sq, Skv, D)
    (2, 2, 2, 64, 64, 32),
    (1, 4, 1, 50, 50, 64),  # GQA 4:1
    (1, 2, 2, 37, 120, 32),  # seq_q < seq_kv: bottom-right causal (chunked prefill)
    (2, 8, 2, 1, 77, 64),  # decoding step, GQA 4:1
    (1, 4, 1, 45, 130, 32),  # GQA with seq_q != seq_kv (repeat path of the lower-right bias)
    (1, 4, 1, 50, 30, 32),  # seq_q > seq_kv: the first causal rows see nothing (output 0)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("shape", SDPA_SHAPES, ids=lambda s: "b{}-h{}/{}-q{}-kv{}-d{}".format(*s))
def test_sdpa_and_reference_match_oracle(shape, causal, dtype):
    B, Hq, Hkv, Sq, Skv, D = shape
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, D, dtype)
    sdpa = longattn.attention(q, k, v, causal=causal, impl="sdpa")
    ref = longattn.attention(q, k, v, causal=causal, impl="reference")
    assert sdpa.shape == ref.shape == q.shape and sdpa.dtype == ref.dtype == dtype
    _assert_out_matches_oracle(sdpa, q, k, v, causal=causal)
    _assert_out_matches_oracle(ref, q, k, v, causal=causal)


def test_sdpa_bottom_right_causal_is_not_top_left():
    """The decoding row (seq_q=1) must see every key under bottom-right causality, not only key 0."""
    q, k, v = _inputs(1, 2, 2, 1, 40, 32)
    out = longattn.attention(q, k, v, causal=True, impl="sdpa")
    _assert_out_matches_oracle(out, q, k, v, causal=False)
    _assert_out_matches_oracle(longattn.attention(q, k, v, causal=True, impl="reference"), q, k, v)


def test_reference_impl_gradients_match_oracle():
    q, k, v = _inputs(1, 4, 1, 33, 70, 32)
    check_against_oracle(_api("reference", causal=True), q, k, v, causal=True)


@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("impl", ["triton", "flex"])
def test_dense_and_causal_through_masked_backends(impl, causal):
    q, k, v = _inputs(1, 4, 1, 45, 100, 32, torch.float16)  # GQA 4:1, bottom-right causal
    check_against_oracle(_api(impl, causal=causal, block=(32, 32)), q, k, v, causal=causal, backward=False)


# ------------------------------------------------------------------------------------------ masked backends
MASK_CASES = {  # name -> (Sq, Skv) -> mask_mod
    "sliding": lambda Sq, Skv: masks.sliding_window(40, offset=Skv - Sq),
    "causal&sinks": lambda Sq, Skv: masks.causal(offset=Skv - Sq) & masks.sinks(4, 24, offset=Skv - Sq),
    "holes": lambda Sq, Skv: masks.causal(offset=Skv - Sq) & (lambda b, h, qi, kv: (qi % 7 != 3) & (h != 1)),
}
BACKEND_SHAPES = [  # (B, Hq, Hkv, Sq, Skv, D)
    (1, 2, 2, 70, 70, 32),
    (2, 4, 1, 45, 100, 64),  # GQA 4:1, seq_q != seq_kv
]


def _shape_id(s):
    return "b{}-h{}/{}-q{}-kv{}-d{}".format(*s)


@pytest.mark.parametrize("impl", ["triton", "flex"])
@pytest.mark.parametrize("mask_name", list(MASK_CASES))
@pytest.mark.parametrize("shape", BACKEND_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
def test_block_backends_mask_mod(dtype, shape, mask_name, impl):
    B, Hq, Hkv, Sq, Skv, D = shape
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, D, dtype)
    mask = MASK_CASES[mask_name](Sq, Skv)
    # triton: backward on the first shape; torch's eager FlexAttention has no backward on CPU
    backward = impl == "triton" and shape == BACKEND_SHAPES[0]
    check_against_oracle(_api(impl, mask=mask, block=(32, 32)), q, k, v, mask=mask, backward=backward)


@pytest.mark.parametrize("impl", ["triton", "flex", "reference"])
@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
def test_block_sparse_mask(impl, dtype):
    q, k, v = _inputs(2, 4, 2, 90, 130, 32, dtype)
    mask = masks.per_head_window([8, 30, 64, 130], offset=40)  # head-dependent
    bs = BlockSparse.from_mask_mod(mask, 1, 4, 90, 130, (32, 64))
    assert bs.shape == (1, 4, 90, 130)
    check_against_oracle(_api(impl, mask=bs), q, k, v, mask=mask, backward=impl != "flex")  # no flex bwd on CPU


@pytest.mark.parametrize("impl", ["triton", "flex", "reference"])
@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
def test_flex_block_mask(impl, dtype):
    q, k, v = _inputs(1, 4, 1, 100, 130, 32, dtype)
    mask = masks.causal(offset=30) & masks.sinks(2, 33, offset=30)
    bm = create_block_mask(mask, None, None, 100, 130, device="cpu", BLOCK_SIZE=(32, 64))
    check_against_oracle(_api(impl, mask=bm), q, k, v, mask=mask, backward=impl == "triton")


@pytest.mark.parametrize("impl", ["triton", "flex", "reference"])
def test_return_lse_empty_rows(impl):
    dtype = torch.float16 if impl == "triton" else torch.float32
    q, k, v = _inputs(1, 2, 2, 60, 60, 32, dtype)
    mask = masks.causal() & masks.MaskMod(lambda b, h, qi, kv: (qi % 5 != 2) & (h == 0))
    res = longattn.attention(q, k, v, mask=mask, impl=impl, return_lse=True, block=(32, 32))
    assert isinstance(res, tuple) and len(res) == 2
    out, lse = res
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (1, 2, 60) and lse.dtype == torch.float32
    empty = torch.zeros(2, 60, dtype=torch.bool)
    empty[0, 2::5] = True
    empty[1] = True
    assert torch.isneginf(lse[0][empty]).all()
    assert torch.isfinite(lse[0][~empty]).all()
    assert torch.equal(out[0][empty], torch.zeros_like(out[0][empty]))
    # return_lse=False gives the bare output, the same one
    alone = longattn.attention(q, k, v, mask=mask, impl=impl, block=(32, 32))
    assert isinstance(alone, torch.Tensor) and torch.equal(alone, out)


@pytest.mark.parametrize("impl", ["triton", "flex", "reference"])
def test_causal_flag_intersects_mask_mod(impl):
    Sq, Skv = 50, 90
    dtype = torch.float16 if impl == "triton" else torch.float32
    q, k, v = _inputs(1, 2, 2, Sq, Skv, 32, dtype)
    # two-sided and centred on the bottom-right diagonal: the causal flag must cut its future half
    window = masks.sliding_window(30, causal=False, offset=Skv - Sq)
    check_against_oracle(_api(impl, mask=window, causal=True, block=(32, 32)), q, k, v,
                         mask=window & masks.causal(offset=Skv - Sq), backward=False)
    # and it differs from the window alone (the intersection is not a no-op)
    both = longattn.attention(q, k, v, mask=window, causal=True, impl=impl, block=(32, 32))
    alone = longattn.attention(q, k, v, mask=window, impl=impl, block=(32, 32))
    assert not torch.equal(both, alone)


@pytest.mark.parametrize("impl", [
    "triton",
    "flex",
    "reference",
])
def test_causal_with_flex_block_mask_is_never_dropped(impl):
    """causal=True with a BlockMask either raises naming ``causal`` (as with a BlockSparse) or is intersected."""
    Sq, Skv = 64, 64
    q, k, v = _inputs(1, 2, 2, Sq, Skv, 32, torch.float16 if impl == "triton" else torch.float32)
    window = masks.sliding_window(20, causal=False)
    bm = create_block_mask(window, None, None, Sq, Skv, device="cpu", BLOCK_SIZE=(32, 32))
    try:
        out, lse = longattn.attention(q, k, v, mask=bm, causal=True, impl=impl, return_lse=True)
    except ValueError as e:
        assert str(e).startswith("causal:"), e
        return
    ref_o, ref_l = reference_attention(*(t.double() for t in (q, k, v)), mask=window, causal=True,
                                       compute_dtype=torch.float64)
    low_o, low_l = reference_attention(q, k, v, mask=window, causal=True, compute_dtype=q.dtype)
    assert_close_to_reference(out, ref_o, low_o)
    assert_close_to_reference(lse, ref_l, low_l.double(), what="lse")


# ------------------------------------------------------------------------------------------ packed varlen
LENS_Q, LENS_KV = [5, 70, 0, 33, 1], [9, 70, 4, 33, 17]


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_cu_seqlens_causal_equals_per_sequence_runs(impl):
    cu_q, cu_kv = _cu(LENS_Q), _cu(LENS_KV)
    dtype = torch.float16 if impl == "triton" else torch.float32
    q, k, v = _inputs(1, 4, 2, int(cu_q[-1]), int(cu_kv[-1]), 32, dtype)
    out, lse = longattn.attention(q, k, v, causal=True, impl=impl, return_lse=True, cu_seqlens_q=cu_q,
                                  cu_seqlens_kv=cu_kv, block=(16, 32))
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    for i in range(len(LENS_Q)):
        if LENS_Q[i] == 0:
            continue
        sq, skv = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_kv[i]), int(cu_kv[i + 1]))
        qi, ki, vi = q[:, :, sq], k[:, :, skv], v[:, :, skv]
        o_i, l_i = longattn.attention(qi, ki, vi, causal=True, impl=impl, return_lse=True, block=(16, 32))
        if impl == "triton":  # blocks restart at every sequence: the same tiles, the same arithmetic
            torch.testing.assert_close(out[:, :, sq], o_i, rtol=0, atol=0)
            torch.testing.assert_close(lse[:, :, sq], l_i, rtol=0, atol=0)
        # both (and the triton path in any case) within the oracle rule of the per-sequence fp64 reference
        ref_o, ref_l = reference_attention(qi.double(), ki.double(), vi.double(), causal=True,
                                           compute_dtype=torch.float64)
        low_o, low_l = reference_attention(qi, ki, vi, causal=True, compute_dtype=dtype)
        assert_close_to_reference(out[:, :, sq], ref_o, low_o, what=f"out[seq {i}]")
        assert_close_to_reference(lse[:, :, sq], ref_l, low_l.double(), what=f"lse[seq {i}]")


def test_cu_seqlens_q_only_is_shared_with_kv():
    lens = [7, 40, 13]
    cu = _cu(lens)
    q, k, v = _inputs(1, 2, 2, sum(lens), sum(lens), 32)
    both = longattn.attention(q, k, v, causal=True, impl="reference", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    one = longattn.attention(q, k, v, causal=True, impl="reference", cu_seqlens_q=cu)
    assert torch.equal(both, one)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["triton", "flex", "reference"])
def test_cu_seqlens_with_mask_mod(impl, causal):
    """The mask sees b = sequence index and sequence-local positions."""
    cu_q, cu_kv = _cu(LENS_Q), _cu(LENS_KV)
    dtype = torch.float16 if impl == "triton" else torch.float32
    q, k, v = _inputs(1, 4, 2, int(cu_q[-1]), int(cu_kv[-1]), 32, dtype)
    inner = masks.MaskMod(lambda b, h, qi, kv: ((kv + b) % 3 != 0) & (qi - kv < 40))
    varlen = {"cu_seqlens_q": cu_q, "cu_seqlens_kv": cu_kv}
    check_against_oracle(_api(impl, mask=inner, causal=causal, block=(16, 32), **varlen), q, k, v, mask=inner,
                         causal=causal, backward=impl == "triton" and causal, **varlen)


# ------------------------------------------------------------------------------------------ low-rank bias
def _dense_fp64(q, k, v, scale, bias_dense, allowed):
    q, k, v = (t.double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * scale + bias_dense
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("impl", ["triton", "flex", "reference"])
@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=str)
def test_low_rank_bias_equals_dense_additive_bias(impl, dtype):
    B, Hq, Hkv, Sq, Skv, D, r = 2, 4, 2, 70, 100, 32, 5
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, D, dtype)
    u, w = _low_rank(B, Hq, Sq, Skv, r, dtype)
    mask = masks.sliding_window(60, offset=Skv - Sq)
    out = longattn.attention(q, k, v, mask=mask, bias=(u, w), impl=impl, block=(32, 32))
    scale = 1 / math.sqrt(D)
    qi, ki = torch.arange(Sq).view(-1, 1), torch.arange(Skv).view(1, -1)
    allowed = mask(None, None, qi, ki)
    ref = _dense_fp64(q, k, v, scale, u.double() @ w.double().transpose(-1, -2), allowed)
    low, _ = reference_attention(q, k, v, mask=mask, bias=(u, w), compute_dtype=dtype)
    assert_close_to_reference(out, ref, low)
    # the bias actually matters
    assert not torch.equal(out, longattn.attention(q, k, v, mask=mask, impl=impl, block=(32, 32)))


def test_low_rank_bias_dense_causal_triton_gradients():
    q, k, v = _inputs(1, 2, 2, 40, 40, 32, torch.float16)
    u, w = _low_rank(1, 2, 40, 40, 3, torch.float16)
    check_against_oracle(_api("triton", causal=True, block=(32, 32)), q, k, v, bias=(u, w), causal=True)


# ------------------------------------------------------------------------------------------ impl="auto"
@pytest.fixture
def fresh_auto_log(monkeypatch, caplog):
    monkeypatch.setattr(api, "_logged", set())
    caplog.set_level(logging.INFO, logger="longattn")
    return caplog


def _auto_records(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "longattn" and "impl='auto'" in r.getMessage()]


@pytest.mark.parametrize("causal", [False, True])
def test_auto_dense_uses_sdpa_and_logs_once(fresh_auto_log, causal):
    q, k, v = _inputs(1, 4, 1, 30, 50, 32)  # GQA and seq_q != seq_kv
    out = longattn.attention(q, k, v, causal=causal)
    assert torch.equal(out, longattn.attention(q, k, v, causal=causal, impl="sdpa"))
    if not causal:
        sdpa = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        assert torch.equal(out, sdpa)
    longattn.attention(q, k, v, causal=causal)
    msgs = _auto_records(fresh_auto_log)
    assert len(msgs) == 1, msgs
    assert "'sdpa'" in msgs[0]


def test_auto_masked_uses_gather_on_cpu_and_logs_once(fresh_auto_log):
    q, k, v = _inputs(1, 2, 2, 40, 40, 32)
    mask = masks.sliding_window(9)
    out = longattn.attention(q, k, v, mask=mask)
    assert torch.equal(out, longattn.attention(q, k, v, mask=mask, impl="gather"))
    out2, lse = longattn.attention(q, k, v, mask=mask, return_lse=True)
    assert torch.equal(out2, longattn.attention(q, k, v, mask=mask, impl="gather", return_lse=True)[0])
    assert lse.shape == (1, 2, 40)
    msgs = _auto_records(fresh_auto_log)
    assert len(msgs) == 1, msgs
    assert "'gather'" in msgs[0]
    # a dense call afterwards logs its own (different) choice, once
    longattn.attention(q, k, v)
    longattn.attention(q, k, v)
    msgs = _auto_records(fresh_auto_log)
    assert len(msgs) == 2 and "'sdpa'" in msgs[1], msgs


def test_auto_lse_only_goes_to_reference(fresh_auto_log):
    q, k, v = _inputs(1, 2, 2, 20, 20, 32)
    out, lse = longattn.attention(q, k, v, causal=True, return_lse=True)
    ref_o, ref_l = longattn.attention(q, k, v, causal=True, impl="reference", return_lse=True)
    assert torch.equal(out, ref_o) and torch.equal(lse, ref_l)
    assert ["'reference'" in m for m in _auto_records(fresh_auto_log)] == [True]


# ------------------------------------------------------------------------------------------ validation
def _bad_calls():
    """name -> (exception type, message regex naming the argument, (q, k, v), kwargs)."""
    q, k, v = _inputs(1, 2, 2, 40, 40, 32)
    q6, k4, v4 = _inputs(1, 6, 4, 40, 40, 32)
    q48, k48, v48 = _inputs(1, 2, 2, 40, 40, 48)
    u, w = _low_rank(1, 2, 40, 40, 3, torch.float32)
    bs_short = BlockSparse.from_mask_mod(masks.causal(), 1, 2, 40, 30, (32, 32))
    bs_ok = BlockSparse.from_mask_mod(masks.causal(), 1, 2, 40, 40, (32, 32))
    batch2 = tuple(t.expand(2, -1, -1, -1).contiguous() for t in (q, k, v))
    return {
        "q-not-4d": (ValueError, r"^q: expected 4 dims", (q[0], k, v), {}),
        "k-dtype": (TypeError, r"^k: expected dtype torch\.float32 like q, got torch\.float64", (q, k.double(), v), {}),
        "v-shape": (ValueError, r"^v: expected shape \(1, 2, 40, 32\) like k", (q, k, v[:, :, :39]), {}),
        "heads-not-divisible": (ValueError, r"^k: query heads \(6\) .* got 4 kv heads", (q6, k4, v4), {}),
        "unknown-impl": (ValueError, r"^impl: expected one of .*'cudnn'", (q, k, v), {"impl": "cudnn"}),
        "triton-head-dim-48": (ValueError, r"^impl='triton': .*head_dim.*got 48", (q48, k48, v48),
                               {"impl": "triton"}),
        "sdpa-with-mask": (ValueError, r"^impl='sdpa': .*mask", (q, k, v), {"impl": "sdpa", "mask": masks.causal()}),
        "sdpa-with-lse": (ValueError, r"^impl='sdpa': .*return_lse", (q, k, v), {"impl": "sdpa", "return_lse": True}),
        "mask-not-callable": (TypeError, r"^mask: expected .*got int", (q, k, v), {"mask": 3}),
        "block-sparse-seq": (ValueError, r"^mask: BlockSparse of shape .*seq_kv=30", (q, k, v), {"mask": bs_short}),
        "bias-u-shape": (ValueError, r"^bias: expected U of shape \(1, 2, 40, r\)", (q, k, v),
                         {"bias": (u[:, :1], w)}),
        "bias-w-shape": (ValueError, r"^bias: expected W of shape \(1, 2, 40, 3\)", (q, k, v),
                         {"bias": (u, w[:, :, :20])}),
        "bias-not-pair": (TypeError, r"^bias: expected a tuple", (q, k, v), {"bias": u}),
        "cu-not-total": (ValueError, r"^cu_seqlens_q: .*from 0 to 40, got \[0, 10, 30\]", (q, k, v),
                         {"cu_seqlens_q": _cu([10, 20])}),
        "cu-kv-not-total": (ValueError, r"^cu_seqlens_kv: .*from 0 to 40", (q, k, v),
                            {"cu_seqlens_q": _cu([10, 30]), "cu_seqlens_kv": _cu([10, 29])}),
        "cu-batch-2": (ValueError, r"cu_seqlens.*batch 1, got 2", batch2, {"cu_seqlens_q": _cu([10, 30])}),
        "causal-block-sparse": (ValueError, r"^causal: encode causality in the BlockSparse", (q, k, v),
                                {"mask": bs_ok, "causal": True}),
    }


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("name", list(BAD_CALLS))
@pytest.mark.parametrize("impl", [None, "reference"])
def test_bad_input_raises_naming_the_argument(name, impl):
    exc, pattern, (q, k, v), kwargs = BAD_CALLS[name]
    if impl is not None and "impl" not in kwargs:
        kwargs = {**kwargs, "impl": impl}
    with pytest.raises(exc, match=pattern):
        longattn.attention(q, k, v, **kwargs)


def test_auto_warns_when_a_gpu_call_falls_back(monkeypatch):
    """On CUDA, a masked call the Triton kernel cannot take (here: head_dim 48) falls back *with* a warning (to
    the gather path, or the reference when only it can take the call); on CPU gather is designed and silent."""
    from types import SimpleNamespace

    import longattn.api as api

    monkeypatch.setattr(api, "_logged", set())
    fake_gpu_q = SimpleNamespace(device=torch.device("cuda", 0), shape=(1, 2, 8, 48), dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="Triton kernel cannot take this call"):
        assert api._choose(fake_gpu_q, masks.causal(), "auto", False, None, None) == "gather"
    with pytest.warns(RuntimeWarning, match="chunked reference"):  # bias: only the reference (or triton) takes it
        assert api._choose(fake_gpu_q, masks.causal(), "auto", False, (1, 1), None) == "reference"
    cpu_q = torch.zeros(1, 2, 8, 48)
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")
        assert api._choose(cpu_q, masks.causal(), "auto", False, None, None) == "gather"


def test_method_modules_import_by_dotted_path():
    """``longattn.methods`` is the methods package (its registry functions re-exported), so a method's module imports
    by its dotted path and the registry answers through it."""
    import importlib

    import longattn.methods.decode.quest as quest_module

    assert longattn.methods.get("quest").factory is quest_module.Quest
    assert "quest" in longattn.methods.names("decode")
    assert importlib.import_module("longattn.methods") is longattn.methods
