"""Checks every dynamic prefill method passes: the oracle rule on its own BlockSparse, the reported density, and
exact dense attention when its budget keeps everything."""

from __future__ import annotations

import math

import pytest
import torch

import longattn
from longattn.kernels.reference import reference_attention
from longattn.masks.block_sparse import BlockSparse
from longattn.masks.core import MaskMod
from tests.oracle import assert_close_to_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (Sq, Skv, kv heads, dtype, head_dim): odd lengths, chunked prefill (Sq < Skv), a single query, GQA 1 / 2 / 4 of
# 4 query heads, head_dim 32 / 64
ORACLE_GRID = [(300, 300, 2, torch.float32, 32), (127, 127, 4, torch.float16, 64), (1, 300, 1, torch.float16, 32),
               (333, 1000, 2, torch.float32, 64)]
ORACLE_IDS = ["300-gqa2-fp32-d32", "127-mha-fp16-d64", "q1-300-gqa4-fp16-d32", "333of1000-gqa2-fp32-d64"]


def qkv(Sq: int, Skv: int | None = None, Hq: int = 4, Hkv: int = 2, D: int = 32, seed: int = 0,
        dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q [1, Hq, Sq, D] (the last Sq positions), k, v [1, Hkv, Skv, D]."""
    Skv = Sq if Skv is None else Skv
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Hq, Skv, D, generator=g)[:, :, Skv - Sq:]
    k, v = (torch.randn(1, Hkv, Skv, D, generator=g) for _ in range(2))
    return tuple(t.to(DEVICE, dtype).contiguous() for t in (q, k, v))


def causal_dense(Sq: int, Skv: int) -> torch.Tensor:
    """bool [Sq, Skv]: bottom-right causal."""
    return torch.arange(Skv).view(1, -1) <= torch.arange(Skv - Sq, Skv).view(-1, 1)


def dense_mask_mod(dense: torch.Tensor) -> MaskMod:
    """A mask_mod reading an element mask [B', H', Sq, Skv] (broadcast over batch and heads)."""
    return MaskMod(lambda b, h, q, kv: dense[b % dense.shape[0], h % dense.shape[1], q, kv], name="dense_lookup")


def check_oracle(bs: BlockSparse, q, k, v, impls: tuple[str, ...] = ("reference", "gather")) -> None:
    """Reference and gather outputs on the BlockSparse equal fp64 dense attention under bs.to_dense()."""
    dense = bs.to_dense()
    assert dense.shape[2:] == (q.shape[2], k.shape[2])
    assert not (dense.cpu() & ~causal_dense(q.shape[2], k.shape[2])).any(), "selection leaves the causal region"
    mod = dense_mask_mod(dense)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), mask=mod)
    low, _ = reference_attention(q, k, v, mask=mod, compute_dtype=q.dtype)
    for impl in impls:
        out = longattn.attention(q, k, v, mask=bs, impl=impl)
        assert_close_to_reference(out, ref, low, what=f"out ({impl})")


def check_density(bs: BlockSparse, reported: float) -> None:
    """The density a method reports is its BlockSparse's own, and (without gathered columns) equals a recount from
    the dense block map: the area of the non-empty blocks over B · H · Sq · Skv."""
    assert reported is not None
    assert abs(bs.density() - reported) <= 1e-12, (bs.density(), reported)
    if bs.columns is None:
        kept = (bs.block_map()[0] != 0).cpu().double().expand(*bs.shape[:2], -1, -1)
        area = bs.q_blocks.lens.cpu().double().view(-1, 1) * bs.kv_blocks.lens.cpu().double().view(1, -1)
        recount = float((kept * area).sum() / (area.sum() * bs.shape[0] * bs.shape[1]))
        assert abs(recount - reported) <= 1e-12, (recount, reported)


def check_keeps_everything(bs: BlockSparse, q, k, v) -> None:
    """A budget that keeps everything: the mask is exactly causal and the output is dense causal attention."""
    Sq, Skv = q.shape[2], k.shape[2]
    dense = bs.to_dense().cpu()
    assert torch.equal(dense, causal_dense(Sq, Skv).expand_as(dense))
    ref, _ = reference_attention(q.double(), k.double(), v.double(), causal=True)
    low, _ = reference_attention(q, k, v, causal=True, compute_dtype=q.dtype)
    assert_close_to_reference(longattn.attention(q, k, v, mask=bs, impl="gather"), ref, low, what="out (gather)")


def check_method_density(method, bs: BlockSparse) -> None:
    """The method's last_density equals the BlockSparse's, and both equal a recount from the element mask: the area
    of every block holding a kept pair, or with gathered columns, the kept blocks' area plus the kept pairs outside
    them (a column pair inside a kept block is not counted twice)."""
    allowed = bs.to_dense()
    bq, bkv = bs.block_size
    Sq, Skv = allowed.shape[-2:]
    nq, nk = math.ceil(Sq / bq), math.ceil(Skv / bkv)
    rows = torch.tensor([min(bq, Sq - i * bq) for i in range(nq)], dtype=torch.float64)
    cols = torch.tensor([min(bkv, Skv - j * bkv) for j in range(nk)], dtype=torch.float64)
    area = rows.view(-1, 1) * cols.view(1, -1)
    if bs.columns is None:
        padded = torch.nn.functional.pad(allowed, (0, nk * bkv - Skv, 0, nq * bq - Sq))
        hit = padded.view(*allowed.shape[:2], nq, bq, nk, bkv).any(-1).any(-2).cpu()
        recount = float((hit * area).sum() / (area.sum() * hit.shape[0] * hit.shape[1]))
    else:
        kept = (bs.block_map()[0] != 0).cpu().expand(*allowed.shape[:2], -1, -1)
        inside = kept.repeat_interleave(bq, 2)[:, :, :Sq].repeat_interleave(bkv, 3)[..., :Skv]
        pairs = (kept * area).sum() + (allowed.cpu() & ~inside).sum()
        recount = float(pairs / (area.sum() * allowed.shape[0] * allowed.shape[1]))
    check_density(bs, method.last_density)
    assert abs(bs.density() - recount) < 1e-12


# (Sq, Skv, Hq, Hkv, D, dtype): square, chunked prefill (Sq < Skv), odd lengths, GQA 2 / 4 / 1, fp32 / fp16
SHAPES = [
    pytest.param(300, 300, 4, 2, 32, torch.float32, id="300-gqa2-fp32"),
    pytest.param(130, 300, 4, 1, 32, torch.float16, id="130of300-gqa4-fp16"),
    pytest.param(127, 127, 4, 4, 64, torch.float32, id="127-mha-d64"),
    pytest.param(1, 70, 4, 2, 32, torch.float32, id="1of70"),
]


def check_standard(method, Sq: int, Skv: int, Hq: int, Hkv: int, D: int, dtype, seed: int = 0) -> BlockSparse:
    """Oracle rule on the method's own sparsity (reference and gather impls) and its reported density."""
    q, k, v = qkv(Sq, Skv, Hq, Hkv, D, seed=seed, dtype=dtype)
    bs = method.estimate(q, k)
    check_oracle(bs, q, k, v)
    check_method_density(method, bs)
    return bs
