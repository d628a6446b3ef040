"""The MaskMod type: a FlexAttention-style predicate with optional block-level bounds.

A mask_mod is a function ``(b, h, q_idx, kv_idx) -> bool tensor`` built only from tensor ops, so it runs
both on broadcast index grids (our block builder, the reference) and under ``torch.vmap`` (FlexAttention).
``MaskMod`` wraps one and adds ``block_bounds``: for a rectangle of queries × keys, whether *any* element
may be True (an upper bound) and whether *all* elements are surely True (a lower bound). Exact or
conservative bounds let ``BlockSparse.from_mask_mod`` skip evaluating empty and full blocks element by element.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

MaskFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
BoundsFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


class MaskMod:
    """A composable attention mask ``(b, h, q_idx, kv_idx) -> bool``; ``&``, ``|`` and ``~`` build new masks.

    ``bounds(b, h, q_lo, q_hi, kv_lo, kv_hi) -> (any, all)`` takes inclusive index ranges (broadcastable int
    tensors) and returns bool tensors: ``any`` must be True wherever some element of the rectangle is True,
    ``all`` may be True only where every element is True. Without bounds every block is evaluated elementwise.
    """

    def __init__(self, fn: MaskFn, *, bounds: BoundsFn | None = None, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"mask_mod: expected a callable (b, h, q_idx, kv_idx) -> bool, got {type(fn).__name__}")
        self.fn = fn
        self.bounds = bounds
        self.name = name or getattr(fn, "__name__", "mask_mod")

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.fn(b, h, q_idx, kv_idx)

    def __repr__(self) -> str:
        return f"MaskMod({self.name})"

    def block_bounds(
        self, b: Tensor, h: Tensor, q_lo: Tensor, q_hi: Tensor, kv_lo: Tensor, kv_hi: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(any, all) for each rectangle; without bounds: any=True, all=False (evaluate every element)."""
        if self.bounds is None:
            shape = torch.broadcast_shapes(b.shape, h.shape, q_lo.shape, kv_lo.shape)
            return (torch.ones(shape, dtype=torch.bool, device=q_lo.device),
                    torch.zeros(shape, dtype=torch.bool, device=q_lo.device))
        return self.bounds(b, h, q_lo, q_hi, kv_lo, kv_hi)

    def shifted(self, offset: int, kv_offset: int = 0) -> MaskMod:
        """The same pattern for queries that sit ``offset`` positions later (query i is absolute position
        i + offset) and keys ``kv_offset`` later: how a square pattern serves chunked prefill and cached decoding
        (offset = seq_kv - seq_q), and one shard pair of a context-parallel ring (both offsets)."""
        if offset == 0 and kv_offset == 0:
            return self
        a = self

        def fn(b, h, q, kv):
            return a(b, h, q + offset, kv + kv_offset)

        def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
            return a.block_bounds(b, h, q_lo + offset, q_hi + offset, kv_lo + kv_offset, kv_hi + kv_offset)

        name = f"{a.name}.shifted({offset})" if kv_offset == 0 else f"{a.name}.shifted({offset}, {kv_offset})"
        return MaskMod(fn, bounds=bounds, name=name)

    def head_offset(self, offset: int) -> MaskMod:
        """The same pattern for a slice of heads starting at ``offset`` (local head h is head h + offset of the
        whole model): how per-head patterns serve head-parallel (Ulysses) attention."""
        if offset == 0:
            return self
        a = self

        def fn(b, h, q, kv):
            return a(b, h + offset, q, kv)

        def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
            return a.block_bounds(b, h + offset, q_lo, q_hi, kv_lo, kv_hi)

        return MaskMod(fn, bounds=bounds, name=f"{a.name}.head_offset({offset})")

    def __and__(self, other: MaskFn) -> MaskMod:
        a, o = self, as_mask_mod(other)

        def fn(b, h, q, kv):
            return a(b, h, q, kv) & o(b, h, q, kv)

        def bounds(*r):
            (any_a, all_a), (any_o, all_o) = a.block_bounds(*r), o.block_bounds(*r)
            return any_a & any_o, all_a & all_o

        return MaskMod(fn, bounds=bounds, name=f"({a.name} & {o.name})")

    def __or__(self, other: MaskFn) -> MaskMod:
        a, o = self, as_mask_mod(other)

        def fn(b, h, q, kv):
            return a(b, h, q, kv) | o(b, h, q, kv)

        def bounds(*r):
            (any_a, all_a), (any_o, all_o) = a.block_bounds(*r), o.block_bounds(*r)
            return any_a | any_o, all_a | all_o

        return MaskMod(fn, bounds=bounds, name=f"({a.name} | {o.name})")

    def __invert__(self) -> MaskMod:
        a = self

        def fn(b, h, q, kv):
            return ~a(b, h, q, kv)

        def bounds(*r):
            any_a, all_a = a.block_bounds(*r)
            return ~all_a, ~any_a

        return MaskMod(fn, bounds=bounds, name=f"~{a.name}")

    __rand__ = __and__
    __ror__ = __or__


def as_mask_mod(mask: MaskFn | MaskMod, argname: str = "mask") -> MaskMod:
    """Wrap a plain callable as a MaskMod (no bounds); pass MaskMods through."""
    if isinstance(mask, MaskMod):
        return mask
    if not callable(mask):
        raise TypeError(f"{argname}: expected a mask_mod callable (b, h, q_idx, kv_idx) -> bool, "
                        f"got {type(mask).__name__}")
    return MaskMod(mask)


def evaluate(mask: MaskFn, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Evaluate a mask on broadcast index grids; the result spans the q/kv grid and keeps size-1 b/h dims
    where the mask does not depend on them (so head- and batch-invariant masks are stored once)."""
    out = mask(b, h, q_idx, kv_idx)
    if not isinstance(out, Tensor):
        out = torch.as_tensor(out, device=q_idx.device)
    if out.dtype != torch.bool:
        raise TypeError(f"mask_mod must return a bool tensor, got dtype {out.dtype}")
    shape = torch.broadcast_shapes(out.shape, q_idx.shape, kv_idx.shape)
    return out.expand(shape) if out.shape != shape else out
