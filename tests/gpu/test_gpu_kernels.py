"""The kernel suite at GPU sizes in bf16 and fp16, forward and backward (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longattn.kernels.block_sparse as kbs
from longattn import masks
from longattn.masks.block_sparse import BlockSparse
from tests.kernels.test_block_sparse_kernel import _inputs, _run_block_sparse, nan_filled_outputs  # noqa: F401
from tests.oracle import check_against_oracle

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GPU_MASKS = {
    "causal": lambda S: masks.causal(),
    "sliding": lambda S: masks.sliding_window(1000),
    "sinks": lambda S: masks.sinks(64, 777),
    "dilated": lambda S: masks.dilated(4, 3, granularity=128),
    "strided": lambda S: masks.strided(4, local_window=256, granularity=128),
    "power": lambda S: masks.power(granularity=128, local=2),
    "document": lambda S: masks.document([S // 3, S - S // 3 - 5, 5]) & masks.causal(),
    "per_head": lambda S: masks.per_head_window([64, 300, 1000, 4000, 64, 300, 1000, 4000]),
    "neighborhood2d": lambda S: masks.neighborhood((S // 64, 64), 13) if S % 64 == 0 else masks.full(),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask_name", list(GPU_MASKS))
@pytest.mark.parametrize("shape", [(4097, 128, 8, 1), (2048, 64, 8, 2), (3000, 128, 8, 8)],
                         ids=lambda s: f"s{s[0]}-d{s[1]}-h{s[2]}/{s[3]}")
def test_gpu_matches_oracle(shape, mask_name, dtype):
    S, D, Hq, Hkv = shape
    q, k, v = _inputs(1, Hq, Hkv, S, S, D, dtype)
    mask = GPU_MASKS[mask_name](S)
    bs = BlockSparse.from_mask_mod(mask, 1, Hq, S, S, (128, 128), device="cuda")
    check_against_oracle(_run_block_sparse(bs), q, k, v, mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_block_64(dtype):
    q, k, v = _inputs(2, 4, 2, 1500, 1700, 64, dtype)
    mask = masks.sinks(16, 200, offset=200)
    bs = BlockSparse.from_mask_mod(mask, 2, 4, 1500, 1700, (64, 64), device="cuda")
    check_against_oracle(_run_block_sparse(bs), q, k, v, mask=mask)


def test_build_128k_under_a_second():
    import time

    for mask in (masks.causal(), masks.sliding_window(4096), masks.sinks(128, 4096)):
        BlockSparse.from_mask_mod(mask, 1, 1, 4096, 4096, 128, device="cuda")  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        BlockSparse.from_mask_mod(mask, 1, 1, 131072, 131072, 128, device="cuda")
        torch.cuda.synchronize()
        assert time.perf_counter() - t0 < 1.0, f"{mask.name} took {time.perf_counter() - t0:.2f}s"


def _forward_path(bs, path):
    """Forward and backward (dK/dV kernel) on a forced path, through autograd."""
    def run(q, k, v, bias):
        return kbs.BlockSparseAttention.apply(q, k, v, None, None, bs, q.shape[-1] ** -0.5, path)
    return run


TMA_MASKS = {
    "causal": lambda S: masks.causal(),
    "sliding": lambda S: masks.sliding_window(1000),
    "sinks": lambda S: masks.sinks(64, 777),
    "holes": lambda S: masks.sinks(64, 300) & masks.MaskMod(lambda b, h, qi, kv: (qi % 5 != 2) | (h != 1)),
}


def _needs(path: str) -> None:
    """Skip a forced kernel path this GPU cannot run: Gluon wgmma is Hopper-only, TMA needs sm90+."""
    major = torch.cuda.get_device_capability()[0]
    if (path == "gluon" and major != 9) or (path == "tma" and major < 9):
        pytest.skip(f"path {path!r} does not run on sm{major}x")


@pytest.mark.parametrize("path", ["gluon", "tma", "generic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask_name", list(TMA_MASKS))
@pytest.mark.parametrize("shape", [(4097, 128, 8, 2), (3000, 64, 4, 4), (1000, 128, 4, 1), (2048, 128, 8, 2)],
                         ids=lambda s: f"s{s[0]}-d{s[1]}-h{s[2]}/{s[3]}")
def test_gpu_forward_paths_match_oracle(shape, mask_name, dtype, path):
    """Every kernel path (Gluon forward and dK/dV on Hopper, TMA forward on sm90+, generic) against the oracle,
    forward and gradients: odd lengths, GQA, partial tiles, empty rows."""
    _needs(path)
    S, D, Hq, Hkv = shape
    q, k, v = _inputs(1, Hq, Hkv, S, S, D, dtype)
    mask = TMA_MASKS[mask_name](S)
    bs = BlockSparse.from_mask_mod(mask, 1, Hq, S, S, (128, 128), device="cuda")
    check_against_oracle(_forward_path(bs, path), q, k, v, mask=mask)
    if mask_name == "holes":
        out, lse = _forward_path(bs, path)(q, k, v, None)
        assert torch.isneginf(lse[:, 1, 2::5]).all() and (out[:, 1, 2::5] == 0).all()


@pytest.mark.parametrize("shape", [(2, 300, 1000, 128, 8, 2), (3, 1, 129, 64, 4, 1), (1, 5000, 5000, 128, 32, 8)],
                         ids=lambda s: f"b{s[0]}-q{s[1]}-kv{s[2]}-d{s[3]}-h{s[4]}/{s[5]}")
def test_gpu_gluon_chunked_prefill_and_batches(shape):
    """The Gluon forward and dK/dV with seq_q != seq_kv (bottom-right causal, as chunked prefill), batches and GQA
    4/8."""
    _needs("gluon")
    B, Sq, Skv, D, Hq, Hkv = shape
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, D, torch.bfloat16)
    mask = masks.causal(offset=Skv - Sq)
    bs = BlockSparse.from_mask_mod(mask, B, Hq, Sq, Skv, (128, 128), device="cuda")
    check_against_oracle(_forward_path(bs, "gluon"), q, k, v, mask=mask)


@settings(max_examples=30, deadline=None)
@given(sq=st.integers(1, 700), skv=st.integers(1, 700), density=st.floats(0.0, 1.0), p=st.floats(0.3, 1.0),
       group=st.sampled_from([1, 4]), seed=st.integers(0, 2**16))
def test_gpu_gluon_random_masks(sq, skv, density, p, group, seed):
    """Random block lists with random element holes (some rows and kv blocks empty) through the Gluon forward and
    dK/dV, against the generic kernels on the same BlockSparse (held to the oracle above); LSE -inf exactly where it
    is."""
    _needs("gluon")
    q, k, v = _inputs(1, group, 1, sq, skv, 128, torch.bfloat16, seed)
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(1, group, -(-sq // 128), -(-skv // 128), generator=g) < density
    table = (torch.rand(group, sq, skv, generator=g) < p) & blocks.repeat_interleave(128, 2).repeat_interleave(
        128, 3)[0, :, :sq, :skv]
    mask = masks.MaskMod(lambda b, h, qi, kv: table.to(qi.device)[h, qi, kv])
    bs = BlockSparse.from_mask_mod(mask, 1, group, sq, skv, (128, 128), device="cuda")
    out, lse = kbs.block_sparse_forward(q, k, v, bs, 0.1, path="gluon")
    ref, ref_lse = kbs.block_sparse_forward(q, k, v, bs, 0.1, path="generic")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=0)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-3, rtol=0)
    do = torch.randn_like(q)
    _, dk, dv, _, _ = kbs.block_sparse_backward(do, q, k, v, ref, ref_lse, None, bs, 0.1, path="gluon")
    _, rdk, rdv, _, _ = kbs.block_sparse_backward(do, q, k, v, ref, ref_lse, None, bs, 0.1, path="generic")
    torch.testing.assert_close(dk, rdk, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dv, rdv, atol=2e-2, rtol=2e-2)


def test_gpu_auto_forward_takes_the_fastest_path():
    """auto: the Gluon kernels on Hopper (forward and dK/dV), the TMA forward on other sm90+ parts, else the generic
    ones."""
    q, k, v = _inputs(1, 2, 2, 256, 256, 128, torch.bfloat16)
    bs = BlockSparse.from_mask_mod(masks.causal(), 1, 2, 256, 256, 128, device="cuda")
    major = torch.cuda.get_device_capability()[0]
    assert kbs._tma_applies(q, k, v, torch.empty_like(q), bs, None) == (major >= 9)
    assert kbs._gluon_applies(q, bs) == (major == 9)
    assert kbs.backward_kernel(q, k, v, q, bs) == ("gluon" if major == 9 else "generic")
    if major == 9:
        torch.testing.assert_close(kbs.block_sparse_forward(q, k, v, bs, 0.1)[0],
                                   kbs.block_sparse_forward(q, k, v, bs, 0.1, path="gluon")[0], atol=0, rtol=0)
    torch.testing.assert_close(kbs.block_sparse_forward(q, k, v, bs, 0.1)[0],
                               kbs.block_sparse_forward(q, k, v, bs, 0.1, path="generic")[0], atol=2e-2, rtol=0)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9, reason="needs sm90+")
@pytest.mark.parametrize("cfg", kbs._fwd_tma_kernel.configs,
                         ids=lambda c: f"w{c.num_warps}-s{c.num_stages}")
def test_gpu_every_tma_config_matches_oracle(cfg):
    """Each autotune candidate of the TMA forward, forced, against the oracle."""
    S, Hq, Hkv, D = 4097, 8, 2, 128
    q, k, v = _inputs(1, Hq, Hkv, S, S, D, torch.bfloat16)
    mask = TMA_MASKS["holes"](S)
    bs = BlockSparse.from_mask_mod(mask, 1, Hq, S, S, (128, 128), device="cuda")

    def run(q, k, v, bias):
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:3], float("nan"), dtype=torch.float32, device="cuda")
        grid, args, consts = kbs._fwd_tma_args(q, k, v, out, lse, bs, D ** -0.5)
        kbs._fwd_tma_kernel.fn[grid](*args, **consts, **cfg.all_kwargs())
        return out, lse

    check_against_oracle(run, q, k, v, mask=mask, backward=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_flex_path_with_lse(dtype):
    """impl='flex' (compiled FlexAttention; LSE through AuxRequest or return_lse, whichever this torch has) against
    the oracle, output and LSE, with GQA and an odd length."""
    import longattn

    q, k, v = _inputs(1, 8, 2, 1000, 1000, 64, dtype)
    mask = masks.sliding_window(300)
    out, lse = longattn.attention(q, k, v, mask=mask, causal=True, impl="flex", return_lse=True)
    ref, ref_lse = longattn.attention(q.double(), k.double(), v.double(), mask=mask, causal=True,
                                      impl="reference", return_lse=True)
    assert (out.double() - ref).abs().max().item() < 2e-2
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-2, rtol=0)
