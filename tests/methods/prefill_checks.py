"""Checks every part-B prefill method passes: the oracle rule on its own sparsity, reported density, and dense
equality at a budget that keeps everything."""

from __future__ import annotations

import math

import pytest
import torch

import longattn
from longattn import masks
from longattn.kernels.reference import reference_attention
from longattn.masks.core import MaskMod
from tests.oracle import assert_close_to_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def qkv(Sq: int, Skv: int | None = None, Hq: int = 4, Hkv: int = 2, D: int = 32, seed: int = 0,
        dtype=torch.float32):
    """Random q [1, Hq, Sq, D], k, v [1, Hkv, Skv, D]."""
    Skv = Sq if Skv is None else Skv
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Hq, Sq, D, generator=g)
    k, v = (torch.randn(1, Hkv, Skv, D, generator=g) for _ in range(2))
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def dense_mask_mod(allowed: torch.Tensor) -> MaskMod:
    """The element mask [B', H', Sq, Skv] as a plain lookup: the oracle never sees the BlockSparse itself."""
    def fn(b, h, q_idx, kv_idx):
        return allowed[b % allowed.shape[0], h % allowed.shape[1], q_idx, kv_idx]

    return MaskMod(fn, name="dense_lookup")


def check_oracle(bs, q, k, v, impls=("reference", "gather")) -> None:
    """Output on ``bs`` (each impl) vs the fp64 reference restricted to ``bs.to_dense()`` (the oracle rule)."""
    lookup = dense_mask_mod(bs.to_dense())
    ref, _ = reference_attention(q.double(), k.double(), v.double(), mask=lookup)
    low, _ = reference_attention(q, k, v, mask=lookup, compute_dtype=q.dtype)
    for impl in impls:
        out = longattn.attention(q, k, v, mask=bs, impl=impl)
        assert_close_to_reference(out, ref, low, what=f"out[{impl}]")


def check_density(method, bs) -> None:
    """The method's reported density equals the BlockSparse's, and both equal a recount from the element mask."""
    allowed = bs.to_dense()
    bq, bkv = bs.block_size
    Sq, Skv = allowed.shape[-2:]
    nq, nk = math.ceil(Sq / bq), math.ceil(Skv / bkv)
    padded = torch.nn.functional.pad(allowed, (0, nk * bkv - Skv, 0, nq * bq - Sq))
    hit = padded.view(*allowed.shape[:2], nq, bq, nk, bkv).any(-1).any(-2)
    rows = torch.tensor([min(bq, Sq - i * bq) for i in range(nq)], dtype=torch.float64)
    cols = torch.tensor([min(bkv, Skv - j * bkv) for j in range(nk)], dtype=torch.float64)
    area = rows.view(-1, 1) * cols.view(1, -1)
    recount = float((hit.cpu() * area).sum() / (area.sum() * hit.shape[0] * hit.shape[1]))
    assert abs(method.last_density - bs.density()) < 1e-12
    assert abs(bs.density() - recount) < 1e-12


def causal_dense(Sq: int, Skv: int) -> torch.Tensor:
    """bool [Sq, Skv]: bottom-right causal."""
    return torch.arange(Skv).view(1, -1) <= torch.arange(Sq).view(-1, 1) + (Skv - Sq)


def check_dense(bs, q, k, v) -> None:
    """A keep-everything budget: exactly the causal mask, and the output equals dense causal attention."""
    Sq, Skv = q.shape[2], k.shape[2]
    assert torch.equal(bs.to_dense().cpu(), causal_dense(Sq, Skv).expand(*bs.to_dense().shape[:2], Sq, Skv))
    ref, _ = reference_attention(q.double(), k.double(), v.double(), mask=masks.causal(offset=Skv - Sq))
    low, _ = reference_attention(q, k, v, mask=masks.causal(offset=Skv - Sq), compute_dtype=q.dtype)
    out = longattn.attention(q, k, v, mask=bs, impl="gather")
    assert_close_to_reference(out, ref, low, what="dense-budget out")


# (Sq, Skv, Hq, Hkv, D, dtype): square, chunked prefill (Sq < Skv), odd lengths, GQA 2 / 4 / 1, fp32 / fp16
SHAPES = [
    pytest.param(300, 300, 4, 2, 32, torch.float32, id="300-gqa2-fp32"),
    pytest.param(130, 300, 4, 1, 32, torch.float16, id="130of300-gqa4-fp16"),
    pytest.param(127, 127, 4, 4, 64, torch.float32, id="127-mha-d64"),
    pytest.param(1, 70, 4, 2, 32, torch.float32, id="1of70"),
]


def check_standard(method, Sq, Skv, Hq, Hkv, D, dtype, seed=0):
    """Oracle rule on the method's own sparsity (reference and gather impls) and its reported density."""
    q, k, v = qkv(Sq, Skv, Hq, Hkv, D, seed=seed, dtype=dtype)
    bs = method.estimate(q, k)
    check_oracle(bs, q, k, v)
    check_density(method, bs)
    return bs
