"""The one tolerance rule of the test suite (DESIGN.md): a fast path's error against the fp64 oracle must be at
most 2x (3x for gradients) the error of plain PyTorch computing in the same low precision, plus a tiny floor."""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.kernels.reference import reference_attention

FLOOR = 1e-5


def max_err(a: Tensor, ref: Tensor) -> float:
    """Max abs difference; positions where the reference is -inf (LSE of empty rows) must match exactly."""
    a, ref = a.detach().double(), ref.detach().double()
    inf = torch.isinf(ref)
    if bool((a[inf] != ref[inf]).any()):
        return float("inf")
    d = (a[~inf] - ref[~inf]).abs()
    return float(d.max()) if d.numel() else 0.0


def assert_close_to_reference(out: Tensor, ref_fp64: Tensor, baseline_lowp: Tensor, *, grad: bool = False,
                              what: str = "out") -> None:
    assert not torch.isnan(out).any(), f"{what}: NaN in output (unwritten or invalid)"
    err, base = max_err(out, ref_fp64), max_err(baseline_lowp, ref_fp64)
    factor = 3.0 if grad else 2.0
    assert err <= factor * base + FLOOR, f"{what}: error {err:.3e} > {factor}x baseline {base:.3e} + {FLOOR}"


def check_against_oracle(run, q: Tensor, k: Tensor, v: Tensor, *, backward: bool = True, bias=None,
                         **ref_kwargs) -> None:
    """``run(q, k, v, bias) -> (out, lse)`` checked (forward and gradients) against the fp64 reference, with the
    same reference computed in the inputs' own precision as the baseline."""
    leaves = [q, k, v] + (list(bias) if bias is not None else [])
    leaves = [t.detach().clone().requires_grad_(backward) for t in leaves]
    q, k, v = leaves[:3]
    b = tuple(leaves[3:]) if bias is not None else None
    out, lse = run(q, k, v, b)
    dout = torch.randn_like(out)
    results = {}
    for name, dtype, compute in (("fast", None, None), ("ref", torch.float64, torch.float64),
                                 ("low", q.dtype, q.dtype)):
        if name == "fast":
            o, ls = out, lse
            xs = leaves
        else:
            xs = [t.detach().to(dtype).requires_grad_(backward) for t in leaves]
            bb = tuple(xs[3:]) if bias is not None else None
            o, ls = reference_attention(*xs[:3], bias=bb, compute_dtype=compute, **ref_kwargs)
        grads = None
        if backward:
            grads = torch.autograd.grad(o, xs, dout.to(o.dtype))
        results[name] = (o, ls, grads)
    (o, ls, g), (ro, rls, rg), (lo, lls, lg) = results["fast"], results["ref"], results["low"]
    assert_close_to_reference(o, ro, lo, what="out")
    assert_close_to_reference(ls, rls, lls.double(), what="lse")
    if backward:
        names = ["dq", "dk", "dv", "du", "dw"]
        for i, (a, r, lp) in enumerate(zip(g, rg, lg, strict=True)):
            assert_close_to_reference(a, r, lp, grad=True, what=names[i])
