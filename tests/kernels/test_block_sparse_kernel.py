"""Triton block-sparse kernels (forward + backward) against the fp64 oracle, under the interpreter on CPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import longattn.kernels.block_sparse as kbs
from longattn import masks
from longattn.kernels.block_sparse import BlockSparseAttention, pad_rank
from longattn.masks.block_sparse import BlockSparse
from tests.oracle import check_against_oracle

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float16, torch.float32) if DEVICE == "cpu" else (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def nan_filled_outputs(monkeypatch):
    """Every buffer the kernels allocate starts as NaN, so a row or block they fail to write is caught."""
    real_like, real = kbs._empty_like, kbs._empty
    monkeypatch.setattr(kbs, "_empty_like", lambda t: real_like(t).fill_(float("nan")))
    monkeypatch.setattr(kbs, "_empty", lambda *a: real(*a).fill_(float("nan")))


def _inputs(B, Hq, Hkv, Sq, Skv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, s: torch.randn(B, h, s, D, generator=g).to(DEVICE, dtype)  # noqa: E731
    return mk(Hq, Sq), mk(Hkv, Skv), mk(Hkv, Skv)


def _run_block_sparse(bs, scale=None):
    def run(q, k, v, bias):
        u, w = pad_rank(*bias) if bias is not None else (None, None)
        return BlockSparseAttention.apply(q, k, v, u, w, bs, scale if scale is not None else q.shape[-1] ** -0.5)
    return run


MASKS = {
    "causal": lambda Sq, Skv: masks.causal(offset=Skv - Sq),
    "sliding": lambda Sq, Skv: masks.sliding_window(96, offset=Skv - Sq),
    "sinks": lambda Sq, Skv: masks.sinks(4, 64, offset=Skv - Sq),
    "dilated": lambda Sq, Skv: masks.dilated(3, 2, granularity=32, offset=Skv - Sq),
    "full": lambda Sq, Skv: masks.full(),
}

GRID = [  # (Sq, Skv, D, Hq, Hkv, block)
    (1, 1, 64, 2, 2, (32, 32)),
    (127, 127, 64, 4, 1, (32, 64)),
    (127, 300, 32, 8, 1, (64, 32)),
    (1, 1000, 64, 4, 4, (16, 64)),
    (1000, 1000, 128, 2, 1, (128, 128)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("shape", GRID, ids=lambda s: f"q{s[0]}-kv{s[1]}-d{s[2]}-h{s[3]}/{s[4]}-blk{s[5][0]}x{s[5][1]}")
def test_matches_oracle(shape, mask_name, dtype):
    Sq, Skv, D, Hq, Hkv, block = shape
    if Sq == 1000 and mask_name in ("full", "dilated") and DEVICE == "cpu":
        pytest.skip("covered at smaller sizes; the interpreter is slow on dense 1000x1000 backward")
    q, k, v = _inputs(2, Hq, Hkv, Sq, Skv, D, dtype)
    mask = MASKS[mask_name](Sq, Skv)
    bs = BlockSparse.from_mask_mod(mask, 2, Hq, Sq, Skv, block, device=DEVICE)
    check_against_oracle(_run_block_sparse(bs), q, k, v, mask=mask)


@pytest.mark.parametrize("mask_name", ["sliding", "sinks"])
def test_long_odd_length_4097(mask_name):
    q, k, v = _inputs(1, 2, 1, 4097, 4097, 64, torch.float16)
    mask = MASKS[mask_name](4097, 4097)
    bs = BlockSparse.from_mask_mod(mask, 1, 2, 4097, 4097, (128, 128), device=DEVICE)
    check_against_oracle(_run_block_sparse(bs), q, k, v, mask=mask, backward=DEVICE != "cpu")


def test_rows_with_nothing_to_attend_give_zero_and_neg_inf_lse():
    q, k, v = _inputs(1, 2, 2, 100, 100, 32, DTYPES[0])
    mask = masks.causal() & masks.MaskMod(lambda b, h, qi, kv: (qi % 7 != 3) & (h == 0))
    bs = BlockSparse.from_mask_mod(mask, 1, 2, 100, 100, (32, 32), device=DEVICE)
    out, lse = BlockSparseAttention.apply(q, k, v, None, None, bs, 0.2)
    empty_rows = torch.zeros(2, 100, dtype=torch.bool)
    empty_rows[0, 3::7] = True
    empty_rows[1] = True
    assert torch.equal(out[0][empty_rows.to(out.device)], torch.zeros_like(out[0][empty_rows.to(out.device)]))
    assert torch.isneginf(lse[0][empty_rows.to(lse.device)]).all()
    assert torch.isfinite(lse[0][~empty_rows.to(lse.device)]).all()
    q.requires_grad_(True)
    out, _ = BlockSparseAttention.apply(q, k, v, None, None, bs, 0.2)
    (dq,) = torch.autograd.grad(out.float().sum(), q)
    assert torch.isfinite(dq).all() and (dq[0, 1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_low_rank_bias(dtype):
    q, k, v = _inputs(2, 4, 2, 130, 70, 32, dtype)
    g = torch.Generator().manual_seed(1)
    u = (torch.randn(2, 4, 130, 5, generator=g) * 0.5).to(DEVICE, dtype)
    w = (torch.randn(2, 4, 70, 5, generator=g) * 0.5).to(DEVICE, dtype)
    mask = masks.causal(offset=70 - 130)
    bs = BlockSparse.from_mask_mod(mask, 2, 4, 130, 70, (32, 32), device=DEVICE)
    check_against_oracle(_run_block_sparse(bs), q, k, v, bias=(u, w), mask=mask)


@pytest.mark.parametrize("used", ["lse", "out+lse"])
def test_lse_gradient_flows(used):
    """d(loss)/d(lse) folds into the backward, alone (no output gradient at all) or beside the output's:
    check against autograd through the reference."""
    q, k, v = _inputs(1, 2, 2, 64, 64, 32, torch.float32 if DEVICE == "cpu" else torch.float16)
    bs = BlockSparse.from_mask_mod(masks.causal(), 1, 2, 64, 64, (32, 32), device=DEVICE)
    from longattn.kernels.reference import reference_attention

    def loss(out, lse):
        return lse.sum() + (out * out).sum() if used == "out+lse" else lse.sum()

    xs = [t.double().requires_grad_() for t in (q, k, v)]
    rg = torch.autograd.grad(loss(*reference_attention(*xs, mask=masks.causal(), scale=0.3)), xs,
                             materialize_grads=True)
    ys = [t.clone().requires_grad_() for t in (q, k, v)]
    g = torch.autograd.grad(loss(*BlockSparseAttention.apply(*ys, None, None, bs, 0.3)), ys, materialize_grads=True)
    for a, r in zip(g, rg, strict=True):
        assert (a.double() - r).abs().max() < 2e-2 * r.abs().max() + 1e-4


@given(
    sq=st.integers(1, 200), skv=st.integers(1, 200), density=st.floats(0.0, 1.0),
    group=st.sampled_from([1, 4]), seed=st.integers(0, 2**16),
)
def test_random_block_masks(sq, skv, density, group, seed):
    q, k, v = _inputs(1, group, 1, sq, skv, 32, torch.float16, seed)
    nq, nk = -(-sq // 32), -(-skv // 32)
    g = torch.Generator().manual_seed(seed)
    blocks = (torch.rand(1, group, nq, nk, generator=g) < density).to(DEVICE)
    bs = BlockSparse.from_block_mask(blocks, sq, skv, (32, 32))
    check_against_oracle(_run_block_sparse(bs), q, k, v, mask=bs, backward=sq * skv < 20000)


@given(sq=st.integers(1, 100), skv=st.integers(1, 100), p=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_random_element_masks(sq, skv, p, seed):
    """Token-level random masks: every block is partial, so the bit tiles carry the whole mask."""
    q, k, v = _inputs(1, 2, 2, sq, skv, 16, torch.float16, seed)
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(2, sq, skv, generator=g) < p
    mask = masks.MaskMod(lambda b, h, qi, kv: table.to(qi.device)[h, qi, kv])
    bs = BlockSparse.from_mask_mod(mask, 1, 2, sq, skv, (16, 32), device=DEVICE)
    check_against_oracle(_run_block_sparse(bs), q, k, v, mask=mask)


def test_packed_varlen_equals_per_sequence_runs():
    lens_q, lens_kv = [5, 70, 0, 33], [9, 70, 4, 33]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist())
    cu_kv = torch.tensor([0] + torch.tensor(lens_kv).cumsum(0).tolist())
    dtype = DTYPES[0]
    q, k, v = _inputs(1, 4, 2, int(cu_q[-1]), int(cu_kv[-1]), 32, dtype)
    from longattn.masks.varlen import causal_per_sequence

    bs = BlockSparse.from_mask_mod(causal_per_sequence(cu_q, cu_kv), 1, 4, int(cu_q[-1]), int(cu_kv[-1]),
                                   (16, 32), device=DEVICE, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv)
    out, lse = BlockSparseAttention.apply(q, k, v, None, None, bs, 0.25)
    for i in range(len(lens_q)):
        if lens_q[i] == 0:
            continue
        sl_q, sl_kv = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_kv[i]), int(cu_kv[i + 1]))
        seq_mask = masks.causal(offset=lens_kv[i] - lens_q[i])
        bs_i = BlockSparse.from_mask_mod(seq_mask, 1, 4, lens_q[i], lens_kv[i], (16, 32), device=DEVICE)
        o_i, l_i = BlockSparseAttention.apply(q[:, :, sl_q], k[:, :, sl_kv], v[:, :, sl_kv], None, None, bs_i, 0.25)
        torch.testing.assert_close(out[:, :, sl_q], o_i, rtol=0, atol=0)
        torch.testing.assert_close(lse[:, :, sl_q], l_i, rtol=0, atol=0)


ALL_FACTORIES = {  # every mask factory of longattn.masks, at small shapes (S = 160 tokens, 4 heads)
    "full": lambda: masks.full(),
    "causal": lambda: masks.causal(),
    "sliding_window": lambda: masks.sliding_window(50),
    "sliding_window_bidir": lambda: masks.sliding_window(40, causal=False),
    "sinks": lambda: masks.sinks(3, 40),
    "dilated": lambda: masks.dilated(3, 2),
    "dilated_blocks": lambda: masks.dilated(2, 2, granularity=32),
    "strided": lambda: masks.strided(4, local_window=16),
    "block_local": lambda: masks.block_local(48),
    "global_tokens": lambda: masks.global_tokens(5) & masks.sliding_window(30, causal=False),
    "random_blocks": lambda: masks.random_blocks(160, 160, 32, 2, seed=3, num_heads=4),
    "bigbird": lambda: masks.bigbird(160, 160, 32, num_random=1, seed=1),
    "power": lambda: masks.power(local=2),
    "longlora_shifted": lambda: masks.longlora_shifted(32, 4),
    "document": lambda: masks.document([60, 1, 99]) & masks.causal(),
    "per_head_window": lambda: masks.per_head_window([8, 30, 70, 160]),
    "neighborhood_1d": lambda: masks.neighborhood((160,), 33, dilation=2),
    "neighborhood_2d": lambda: masks.neighborhood((10, 16), (3, 5), stride=(1, 2)),
    "neighborhood_3d": lambda: masks.neighborhood((4, 5, 8), 3, causal=(True, False, False)),
    "radial": lambda: masks.radial(10, 16, sink_frames=1),
    "composed": lambda: (masks.sliding_window(20) | masks.global_tokens(4)) & ~masks.block_local(16, causal=False),
}


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_every_mask_factory_through_the_kernel(name):
    """Each factory → BlockSparse → Triton kernel, forward and backward, against the fp64 oracle on the mask."""
    q, k, v = _inputs(1, 4, 2, 160, 160, 32, DTYPES[0])
    mask = ALL_FACTORIES[name]()
    bs = BlockSparse.from_mask_mod(mask, 1, 4, 160, 160, (32, 32), device=DEVICE)
    check_against_oracle(_run_block_sparse(bs), q, k, v, mask=mask)


def _forward_path(bs, path):
    def run(q, k, v, bias):
        return kbs.block_sparse_forward(q, k, v, bs, q.shape[-1] ** -0.5, path=path)
    return run


TMA_GRID = [  # (Sq, Skv, D, Hq, Hkv, block, mask): odd lengths, GQA, partial tiles, rows with nothing to attend
    (127, 127, 32, 4, 1, (32, 64), "sliding"),
    (100, 300, 16, 2, 2, (64, 32), "causal"),
    (1, 70, 32, 2, 1, (16, 32), "sinks"),
    (150, 150, 32, 4, 2, (32, 32), "holes"),
    (128, 256, 32, 4, 2, (32, 64), "holes"),
]


@pytest.mark.parametrize("shape", TMA_GRID, ids=lambda s: f"q{s[0]}-kv{s[1]}-d{s[2]}-h{s[3]}/{s[4]}-{s[6]}")
def test_tma_forward_matches_oracle(shape):
    """The tensor-descriptor forward (what Hopper runs) against the oracle, under the interpreter in fp16."""
    Sq, Skv, D, Hq, Hkv, block, name = shape
    q, k, v = _inputs(2, Hq, Hkv, Sq, Skv, D, torch.float16)
    mask = masks.causal(offset=Skv - Sq) & masks.MaskMod(lambda b, h, qi, kv: (qi % 5 != 2) | (h != 1)) \
        if name == "holes" else MASKS[name](Sq, Skv)
    bs = BlockSparse.from_mask_mod(mask, 2, Hq, Sq, Skv, block, device=DEVICE)
    check_against_oracle(_forward_path(bs, "tma"), q, k, v, mask=mask, backward=False)
    if name == "holes":  # rows with nothing to attend: zero output, LSE -inf, exactly as the generic path
        out, lse = _forward_path(bs, "tma")(q, k, v, None)
        ref_out, ref_lse = _forward_path(bs, "generic")(q, k, v, None)
        assert torch.isneginf(lse[:, 1, 2::5]).all() and (out[:, 1, 2::5] == 0).all()
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


def test_tma_path_refuses_what_it_cannot_take():
    q, k, v = _inputs(1, 2, 2, 64, 64, 32, torch.float16)
    bs = BlockSparse.from_mask_mod(masks.causal(), 1, 2, 64, 64, (32, 32), device=DEVICE)
    u = torch.zeros(1, 2, 64, 16, dtype=q.dtype, device=DEVICE)
    with pytest.raises(ValueError, match="path"):
        kbs.block_sparse_forward(q, k, v, bs, 0.2, bias=(u, u), path="tma")
    with pytest.raises(ValueError, match="path"):
        kbs.block_sparse_forward(q.float(), k.float(), v.float(), bs, 0.2, path="tma")
    with pytest.raises(ValueError, match="path"):
        kbs.block_sparse_forward(q, k, v, bs, 0.2, path="fast")
    with pytest.raises(ValueError, match="path: 'gluon'"):  # Hopper GPUs only; 32x32 blocks here in any case
        kbs.block_sparse_forward(q, k, v, bs, 0.2, path="gluon")


def test_forward_kernel_names_the_kernel_a_call_runs():
    """auto takes the generic kernel off the GPU (the interpreter runs the TMA one only when asked); a forced
    path that cannot run is refused by name."""
    q, k, v = _inputs(1, 2, 2, 64, 64, 32, torch.float16)
    bs = BlockSparse.from_mask_mod(masks.causal(), 1, 2, 64, 64, (32, 32), device=DEVICE)
    if DEVICE == "cpu":
        assert kbs.forward_kernel(q, k, v, bs) == "generic"
        assert kbs.forward_kernel(q, k, v, bs, path="generic") == "generic"
        if kbs.INTERPRET:
            assert kbs.forward_kernel(q, k, v, bs, path="tma") == "tma"
    with pytest.raises(ValueError, match="path: 'gluon'"):
        kbs.forward_kernel(q, k, v, bs, path="gluon")
    with pytest.raises(ValueError, match="path: expected"):
        kbs.forward_kernel(q, k, v, bs, path="cudnn")


def test_backward_kernel_choice_and_forced_paths():
    """dK/dV: "generic" wherever the Hopper Gluon kernel cannot run (here: this device, 32 x 32 blocks); a forced
    "gluon" that cannot run is an error naming the argument, as is an unknown path; "tma" runs the generic one."""
    q, k, v = _inputs(1, 2, 2, 64, 64, 32, torch.float16)
    bs = BlockSparse.from_mask_mod(masks.causal(), 1, 2, 64, 64, (32, 32), device=DEVICE)
    for path in ("auto", "generic", "tma"):
        assert kbs.backward_kernel(q, k, v, q, bs, path=path) == "generic"
    with pytest.raises(ValueError, match="path: 'gluon'"):
        kbs.backward_kernel(q, k, v, q, bs, path="gluon")
    with pytest.raises(ValueError, match="path: expected"):
        kbs.backward_kernel(q, k, v, q, bs, path="flash")
    out, lse = kbs.block_sparse_forward(q, k, v, bs, 0.2)
    with pytest.raises(ValueError, match="path: 'gluon'"):
        kbs.block_sparse_backward(q, q, k, v, out, lse, None, bs, 0.2, path="gluon")


def test_gluon_unavailable_warns_once_and_keeps_the_tma_kernel(monkeypatch):
    """A Triton without Gluon's Hopper API: the choice falls to the TMA kernel, said once, never silently."""
    import sys
    import types
    import warnings

    monkeypatch.setattr(kbs, "INTERPRET", False)
    monkeypatch.setattr(kbs, "_GLUON_MISSING", [])
    monkeypatch.setitem(sys.modules, "longattn.kernels.block_sparse_gluon", None)  # import raises ImportError
    fake_cuda_q = types.SimpleNamespace(is_cuda=True)
    with pytest.warns(RuntimeWarning, match="Gluon kernels need Triton"):
        assert kbs._gluon_applies(fake_cuda_q, None) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kbs._gluon_applies(fake_cuda_q, None) is False
