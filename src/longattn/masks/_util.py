"""Shared helpers of the mask factories: argument checks, per-device captured tensors, bound arithmetic.

Bound helpers work on int64 tensors of inclusive index ranges; they are used only by ``bounds`` functions,
which run eagerly (never under vmap), while the per-device cache also serves the mask functions themselves.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable

import torch
from torch import Tensor


# --------------------------------------------------------------------------------------------- validation
def _what(minimum: int | None) -> str:
    return {None: "an int", 0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")


def check_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None,
              what: str | None = None) -> int:
    """Return ``value`` as a Python int, or raise TypeError/ValueError naming ``name``."""
    what = what or (_what(minimum) if maximum is None else f"an int in [{minimum}, {maximum}]")
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name}: expected {what}, got bool {value!r}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__} {value!r}") from None
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise ValueError(f"{name}: expected {what}, got {v}")
    return v


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool, else raise TypeError naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


def int_vector(name: str, values: object, *, minimum: int | None = None, allow_empty: bool = False) -> Tensor:
    """A 1-D int64 CPU tensor from a sequence of ints or a 1-D integer tensor, checked against ``minimum``."""
    what = f"a 1-D integer tensor or a sequence of ints{'' if minimum is None else f' (each >= {minimum})'}"
    if isinstance(values, Tensor):
        if values.dim() != 1 or values.dtype == torch.bool or values.dtype.is_floating_point or values.is_complex():
            raise TypeError(f"{name}: expected {what}, got a tensor of shape {tuple(values.shape)} "
                            f"and dtype {values.dtype}")
        out = values.detach().to("cpu", torch.int64)
    else:
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError(f"{name}: expected {what}, got {type(values).__name__} {values!r}")
        out = torch.tensor([check_int(f"{name}[{i}]", v) for i, v in enumerate(values)], dtype=torch.int64)
    if out.numel() == 0 and not allow_empty:
        raise ValueError(f"{name}: expected {what} with at least one value, got an empty one")
    if minimum is not None and out.numel() and bool((out < minimum).any()):
        i = int(torch.nonzero(out < minimum)[0, 0])
        raise ValueError(f"{name}: expected {what}, got {int(out[i])} at index {i}")
    return out


def per_axis(name: str, value: object, ndim: int, check: Callable[[str, object], object]) -> tuple:
    """Broadcast an int/bool or a tuple of them to one value per axis, checking each with ``check``."""
    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            raise ValueError(f"{name}: expected one value or {ndim} values (one per grid axis), "
                             f"got {len(value)} values {tuple(value)!r}")
        return tuple(check(f"{name}[{i}]", v) for i, v in enumerate(value))
    return (check(name, value),) * ndim


def fmt_name(func: str, *args: object, **kwargs: tuple[object, object]) -> str:
    """``func(arg, key=value)`` listing only keyword knobs that differ from their default ``(value, default)``."""
    parts = [repr(a) if isinstance(a, str) else str(a) for a in args]
    parts += [f"{k}={v!r}" for k, (v, default) in kwargs.items() if v != default]
    return f"{func}({', '.join(parts)})"


# --------------------------------------------------------------------------------------------- captured tensors
class DeviceCache:
    """A tensor captured by a mask, copied once to each device it is asked for (the index tensors' device)."""

    def __init__(self, tensor: Tensor):
        self.cpu = tensor
        self._copies: dict[torch.device, Tensor] = {tensor.device: tensor}

    def on(self, device: torch.device) -> Tensor:
        t = self._copies.get(device)
        if t is None:
            t = self.cpu.to(device)
            if not torch.compiler.is_compiling():  # no Python side effects while torch.compile traces
                self._copies[device] = t
        return t


# --------------------------------------------------------------------------------------------- bound arithmetic
def tmax(a, b):
    """Elementwise max of tensors and/or Python ints."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.maximum(a, b)
    if isinstance(a, Tensor):
        return a.clamp(min=b)
    if isinstance(b, Tensor):
        return b.clamp(min=a)
    return max(a, b)


def tmin(a, b):
    """Elementwise min of tensors and/or Python ints."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.minimum(a, b)
    if isinstance(a, Tensor):
        return a.clamp(max=b)
    if isinstance(b, Tensor):
        return b.clamp(max=a)
    return min(a, b)


def range_bounds(vmin, vmax, lo, hi) -> tuple[Tensor, Tensor]:
    """(any, all) for a quantity taking every integer value in [vmin, vmax], kept iff lo <= value <= hi."""
    return tmax(vmin, lo) <= tmin(vmax, hi), (vmin >= lo) & (vmax <= hi)


def has_multiple(lo, hi, m: int):
    """Whether the integer interval [lo, hi] contains a multiple of ``m``."""
    return (hi // m) * m >= lo if m != 1 else lo <= hi


def same_unit_causal_any(pl, ph, kl, kh, unit: int):
    """Any (p, k) in [pl, ph] x [kl, kh] with p // unit == k // unit and k <= p (exact)."""
    return (tmax(pl // unit, kl // unit) <= tmin(ph // unit, kh // unit)) & (kl <= ph)


def highest_pow2(x: Tensor) -> Tensor:
    """The largest power of two <= x for x >= 1 (1 for x <= 1)."""
    x = x.clamp(min=1)
    for s in (1, 2, 4, 8, 16, 32):
        x = x | (x >> s)
    return x - (x >> 1)


def finish(any_: Tensor, all_: Tensor, q_lo: Tensor, kv_lo: Tensor) -> tuple[Tensor, Tensor]:
    """Expand (any, all) to span the rectangle grid (size-1 b/h dims stay where the mask ignores them)."""
    any_ = torch.as_tensor(any_, dtype=torch.bool, device=q_lo.device)
    all_ = torch.as_tensor(all_, dtype=torch.bool, device=q_lo.device)
    shape = torch.broadcast_shapes(any_.shape, all_.shape, q_lo.shape, kv_lo.shape)
    return any_.expand(shape), all_.expand(shape)
