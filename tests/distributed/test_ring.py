"""Ring attention on 2 and 4 gloo ranks against the single-process oracle on the whole sequence: outputs, LSE and
the gradients of q, k and v (through the output and the LSE), both layouts, causal and not, GQA, odd chunks."""

from __future__ import annotations

import itertools

import pytest
import torch

from longattn import attention, masks
from longattn.distributed import LAYOUTS, positions, ring_attention, shard, unshard
from tests.distributed.launch import spawn

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
MASKS = {"window7": lambda S: masks.sliding_window(7),  # shorter than a shard: far shard pairs are skipped
         "documents": lambda S: masks.document([3, S // 2 - 3, S - S // 2]),  # a packed batch with causal below
         "per_head": lambda S: masks.per_head_window([2, 5, 9, S])}


def _full_inputs(world: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(7)
    S = 2 * world * 5  # zigzag chunks of 5 tokens: nothing lines up with a power of two
    q, k, v = (torch.randn(1, h, S, 16, generator=g, dtype=dtype) for h in (4, 2, 2))
    grads = torch.randn(1, 4, S, 16, generator=g, dtype=dtype), torch.randn(1, 4, S, generator=g)
    return q, k, v, grads


def _loss(out, lse, grads):
    return (out * grads[0]).sum() + (lse * grads[1].to(lse.dtype)).sum()


def check_ring(rank: int, world: int, layouts: tuple[str, ...], dtype_name: str, impl: str,
               mask_names: tuple[str, ...] = ()) -> None:
    dtype = getattr(torch, dtype_name)
    q, k, v, grads = _full_inputs(world, dtype)
    for layout in layouts:
        torch.testing.assert_close(unshard(shard(q, rank, world, layout=layout), layout=layout), q, rtol=0, atol=0)
    cases = [(lay, c, None) for lay, c in itertools.product(layouts, (False, True))]
    cases += [(lay, name != "window7", name) for lay, name in itertools.product(layouts, mask_names)]
    for layout, causal, mask_name in cases:
        mask = MASKS[mask_name](q.shape[2]) if mask_name else None
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = attention(*full, mask=mask, causal=causal, impl="reference", return_lse=True)
        _loss(out, lse, grads).backward()
        local = [shard(t, rank, world, layout=layout).detach().requires_grad_() for t in (q, k, v)]
        out_l, lse_l = ring_attention(*local, mask=mask, causal=causal, layout=layout, impl=impl, return_lse=True)
        _loss(out_l, lse_l, [shard(g, rank, world, layout=layout) for g in grads]).backward()
        def part(t, layout=layout):
            return shard(t.detach(), rank, world, layout=layout)

        tol = TOL[dtype]
        torch.testing.assert_close(out_l, part(out), rtol=tol, atol=tol)
        torch.testing.assert_close(lse_l, part(lse), rtol=tol, atol=tol)
        for name, mine, ref in zip("qkv", local, full, strict=True):
            torch.testing.assert_close(mine.grad, part(ref.grad), rtol=tol, atol=tol,
                                       msg=lambda m, n=name, c=causal, lay=layout, mk=mask_name: f"d{n} {c=} "
                                                                                                 f"{lay} {mk}: {m}")


@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_oracle_fp64(world):
    """Both layouts, causal and not, and three mask_mods over global positions (a window shorter than a shard,
    documents of a packed batch, per-head windows); one process group per world size (spawning dominates)."""
    spawn(check_ring, world, LAYOUTS, "float64", "reference", tuple(MASKS))


def test_ring_on_the_triton_kernel():
    """The same check with every partial attention (and its backward, LSE gradient included) on the Triton kernel
    (interpreted on CPU)."""
    spawn(check_ring, 2, ("zigzag",), "float32", "triton")


def test_layouts_place_chunks_as_documented():
    assert positions(0, 2, 8, layout="zigzag").tolist() == [0, 1, 6, 7]
    assert positions(1, 2, 8, layout="zigzag").tolist() == [2, 3, 4, 5]
    assert positions(1, 2, 8).tolist() == [4, 5, 6, 7]
    x = torch.arange(8).view(1, 1, 8, 1)
    assert shard(x, 1, 2, layout="zigzag").flatten().tolist() == [2, 3, 4, 5]


def test_window_shorter_than_a_shard_skips_far_shards():
    """A 3-token window over 10-token shards touches only a rank's own shard and its left neighbour's."""
    from longattn.distributed.ring import _plan

    window = masks.sliding_window(3)
    q = torch.zeros(1, 2, 10, 4)
    for layout in LAYOUTS:
        plans = [_plan(src, 2, 4, q, True, window, layout) for src in range(4)]
        touched = [src for src, plan in enumerate(plans) if plan]
        assert touched == ([1, 2] if layout == "contiguous" else [1, 2, 3]), (layout, touched)


def test_bad_input():
    q = torch.randn(1, 4, 6, 16)
    with pytest.raises(RuntimeError, match="group"):
        ring_attention(q, q, q)
    with pytest.raises(ValueError, match="layout"):
        ring_attention(q, q, q, layout="spiral")
    with pytest.raises(ValueError, match="odd"):
        ring_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5])
    with pytest.raises(ValueError, match="q/k"):
        ring_attention(q, q[:, :3], q[:, :3])
    with pytest.raises(ValueError, match="x: sequence length 6"):
        shard(q, 0, 4, layout="zigzag")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_zigzag_gives_every_rank_the_same_work(world):
    """Causal ring steps under zigzag: every rank computes half a shard-by-shard block at each step after the
    first (contiguous shards leave rank 0 idle and the last rank busy)."""
    from longattn.distributed.ring import _pieces

    n = 10

    def area(rows: slice, cols: slice) -> int:
        return len(range(n)[rows]) * len(range(n)[cols])

    for step in range(1, world):
        work = [sum(area(r, c) for r, c, _ in _pieces((rank - step) % world, rank, n, True, "zigzag"))
                for rank in range(world)]
        assert work == [n * n // 2] * world
        contiguous = [sum(area(r, c) for r, c, _ in _pieces((rank - step) % world, rank, n, True, "contiguous"))
                      for rank in range(world)]
        assert contiguous[0] == 0 and contiguous[-1] == n * n
