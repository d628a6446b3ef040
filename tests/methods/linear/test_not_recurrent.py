"""Layers without a finite-state recurrence (kernel_rpe, long_conv, probsparse, softplus): the fast parallel form
against the naive formula (fp64 oracle rule, outputs and gradients), their special cases, and their errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from longattn.methods.registry import get
from tests.oracle import assert_close_to_reference

D_MODEL = 16
CONFIGS = {"kernel_rpe": dict(n_heads=2, max_len=64), "long_conv": dict(max_len=256),
           "probsparse": dict(n_heads=2, factor=2), "softplus": dict(n_heads=2, chunk=16)}


def make(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = get(name).factory(D_MODEL, **CONFIGS[name]).double()
    for p in layer.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    return layer


def run(layer, x, dout, form, dtype, fixed=None):
    layer = copy.deepcopy(layer).to(dtype)
    if fixed is not None:  # the same active queries in every precision (selection is not differentiable)
        layer.active = lambda q, k: fixed
    x = x.detach().to(dtype).requires_grad_(True)
    y = layer(x) if form == "fast" else layer.reference(x)
    leaves = [x, *layer.parameters()]
    return y, torch.autograd.grad(y, leaves, dout.to(dtype))


@pytest.mark.parametrize("S", [1, 37, 130])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fast_form_matches_the_naive_formula(name, S):
    layer = make(name)
    g = torch.Generator().manual_seed(S)
    x = torch.randn(2, S, D_MODEL, generator=g, dtype=torch.float64)
    dout = torch.randn(2, S, D_MODEL, generator=g, dtype=torch.float64)
    fixed = None
    if name == "probsparse":
        l32 = copy.deepcopy(layer).float()
        fixed = l32.active(*l32._heads(x.float())[:2])
    ref, ref_g = run(layer, x, dout, "ref", torch.float64, fixed)
    fast, fast_g = run(layer, x, dout, "fast", torch.float32, fixed)
    base, base_g = run(layer, x, dout, "ref", torch.float32, fixed)
    assert_close_to_reference(fast, ref, base, what=f"{name} y")
    for i, (a, r, b) in enumerate(zip(fast_g, ref_g, base_g, strict=True)):
        assert_close_to_reference(a, r, b, grad=True, what=f"{name} grad[{i}]")


def test_probsparse_with_every_query_active_is_causal_softmax():
    layer = get("probsparse").factory(D_MODEL, 2, factor=100).double()
    x = torch.randn(2, 40, D_MODEL, dtype=torch.float64)
    q, k, v = layer._heads(x)
    ref = layer._out(F.scaled_dot_product_attention(q, k, v, is_causal=True))
    torch.testing.assert_close(layer(x), ref)


def test_probsparse_sampled_scores_pick_u_distinct_queries():
    torch.manual_seed(0)
    layer = get("probsparse").factory(D_MODEL, 2, factor=3, sample=8)
    q, k, _ = layer._heads(torch.randn(2, 100, D_MODEL))
    idx = layer.active(q, k)
    assert idx.shape == (2, 2, 3 * 5) and all(len(set(r.tolist())) == 15 for r in idx.flatten(0, 1))
    assert layer(torch.randn(2, 100, D_MODEL)).shape == (2, 100, D_MODEL)


def test_bad_inputs_raise():
    for name in CONFIGS:
        with pytest.raises(ValueError, match="x: expected"):
            make(name)(torch.randn(2, 5, D_MODEL + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_len=256"):
        make("long_conv")(torch.randn(1, 257, D_MODEL, dtype=torch.float64))
    with pytest.raises(ValueError, match="factor"):
        get("probsparse").factory(D_MODEL, 2, factor=0)
    with pytest.raises(ValueError, match="n_heads"):
        get("kernel_rpe").factory(D_MODEL, 3)
    with pytest.raises(ValueError, match="power"):
        get("softplus").factory(D_MODEL, 2, power=0.5)


def test_softplus_power_one_is_length_scaled_softplus_normalised():
    layer = get("softplus").factory(D_MODEL, 2, power=1.0).double()
    x = torch.randn(1, 9, D_MODEL, dtype=torch.float64)
    q, k, v = layer._heads(x)
    n = torch.arange(1, 10, dtype=torch.float64)[:, None]
    w = F.softplus(q @ k.transpose(-1, -2) / (D_MODEL // 2) ** 0.5 * torch.log(n + 1)).tril()
    torch.testing.assert_close(layer(x), layer._out((w / w.sum(-1, keepdim=True)) @ v))
