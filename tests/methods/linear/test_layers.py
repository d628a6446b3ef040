"""Every registered linear layer: parallel form == recurrent form (outputs and gradients, judged against the fp64
recurrence with the oracle rule), split-then-resume == one run, and clear errors on bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from longattn.methods.linear.base import LinearLayer
from longattn.methods.registry import get, names
from tests.oracle import assert_close_to_reference

D_MODEL = 32
# small configs with short chunks/windows so odd lengths cross several chunk and window boundaries
CONFIGS = {
    "linear_elu": dict(n_heads=2, chunk=16),
    "lightning": dict(n_heads=4, chunk=16),
    "transnormer": dict(n_heads=2, chunk=16, decay=[0.9, 1.0]),
    "retnet": dict(n_heads=2, chunk=16),
    "based": dict(n_heads=2, feature_dim=4, window=8, chunk=16),
    "hedgehog": dict(n_heads=2, feature_dim=8, chunk=16),
    "aaren": dict(n_heads=2),
    "titans": dict(n_heads=2, chunk=4),
    "lightnet": dict(n_heads=2, chunk=16),
    "flowformer": dict(n_heads=2, chunk=16),
}


def make(name: str, dtype=torch.float64, seed: int = 0) -> LinearLayer:
    torch.manual_seed(seed)
    layer = get(name).factory(D_MODEL, **CONFIGS[name]).to(dtype)
    for p in layer.parameters():  # non-trivial norms/gates, so they are exercised too
        p.data.add_(0.1 * torch.randn_like(p))
    return layer


def recurrent(layer: LinearLayer, x: torch.Tensor, state=None):
    ys = []
    for t in range(x.shape[1]):
        y, state = layer.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


def outputs_and_grads(layer, x, dout, form):
    layer = copy.deepcopy(layer).to(x.dtype)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x) if form == "parallel" else recurrent(layer, x)[0]
    leaves = [x, *layer.parameters()]
    grads = torch.autograd.grad(y, leaves, dout.to(y.dtype), allow_unused=True)
    return y, [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads, strict=True)]


NOT_RECURRENT = {"kernel_rpe", "long_conv", "probsparse", "softplus"}  # tested in test_not_recurrent.py


def test_every_config_is_registered():
    assert set(CONFIGS) | NOT_RECURRENT == set(names("linear"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=["fp16", "fp32", "fp64"])
@pytest.mark.parametrize("S", [1, 37, 130])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parallel_equals_recurrent(name, S, dtype):
    layer = make(name)
    g = torch.Generator().manual_seed(S)
    x = torch.randn(2, S, D_MODEL, generator=g, dtype=torch.float64)
    dout = torch.randn(2, S, D_MODEL, generator=g, dtype=torch.float64)
    ref, ref_g = outputs_and_grads(layer, x, dout, "recurrent")
    fast, fast_g = outputs_and_grads(layer, x.to(dtype), dout, "parallel")
    # baseline: the plain recurrence in the same precision (fp64: the oracle itself, so only the floor is allowed)
    base, base_g = (ref, ref_g) if dtype == torch.float64 else outputs_and_grads(layer, x.to(dtype), dout, "recurrent")
    assert_close_to_reference(fast, ref, base, what=f"{name} y")
    for i, (a, r, b) in enumerate(zip(fast_g, ref_g, base_g, strict=True)):
        assert_close_to_reference(a, r, b, grad=True, what=f"{name} grad[{i}]")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_split_then_resume_equals_one_run(name):
    layer = make(name)
    x = torch.randn(2, 75, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref, ref_state = layer(x, return_state=True)
    layer32, x32 = copy.deepcopy(layer).float(), x.float()
    base, _ = layer32(x32, return_state=True)
    # parallel 30 | parallel 40 | recurrent 5
    y1, st = layer32(x32[:, :30], return_state=True)
    y2, st = layer32(x32[:, 30:70], state=st, return_state=True)
    y3, st = recurrent(layer32, x32[:, 70:], st)
    assert_close_to_reference(torch.cat([y1, y2, y3], 1), ref, base, what=f"{name} resumed")
    assert set(st) == set(ref_state)
    for n in st:
        ref_n = ref_state[n]
        finite = torch.isfinite(ref_n)
        assert torch.equal(finite, torch.isfinite(st[n]))
        assert_close_to_reference(st[n][finite], ref_n[finite], layer32(x32, return_state=True)[1][n][finite],
                                  what=f"{name} state[{n}]")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_bytes_match_the_state(name):
    layer = make(name, torch.float32)
    _, st = layer(torch.randn(3, 5, D_MODEL), return_state=True)
    assert layer.state_bytes(3, torch.float32) == sum(t.numel() * 4 for t in st.values())
    assert layer.state_bytes(1, torch.float16) * 6 == layer.state_bytes(3, torch.float32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bad_state_and_input_raise(name):
    layer = make(name, torch.float32)
    x = torch.randn(2, 4, D_MODEL)
    _, st = layer(x, return_state=True)
    with pytest.raises(ValueError, match="state"):
        layer(x[:1], state=st)  # batch 2 state for batch 1
    key = next(iter(st))
    bad = {**st, key: torch.cat([st[key], st[key][:, :1]], 1)}
    with pytest.raises(ValueError, match=rf"state\['{key}'\]"):
        layer.step(x[:, 0], bad)
    with pytest.raises(ValueError, match="state: expected keys"):
        layer(x, state={"nope": st[key]})
    with pytest.raises(TypeError, match="state"):
        layer(x, state=[st[key]])
    with pytest.raises(ValueError, match="x: expected"):
        layer(x[..., :-1])
    with pytest.raises(ValueError, match="x_t: expected"):
        layer.step(x)


@pytest.mark.parametrize("decay", [[0.5, 1.5], [0.0, 0.5], [-0.1, 0.9], [0.9]])
def test_decay_outside_unit_interval_raises(decay):
    with pytest.raises(ValueError, match="decay"):
        get("transnormer").factory(D_MODEL, 2, decay=decay)
    with pytest.raises(ValueError, match="decay"):
        get("lightning").factory(D_MODEL, 2, decay=decay)


def test_inconsistent_feature_map_raises():
    layer = make("linear_elu", torch.float32)
    layer.feature_map = lambda t: torch.cat([t, t], -1)  # doubles head_dim: no longer matches the state
    with pytest.raises(ValueError, match="feature_map: expected features of size feature_dim=16"):
        layer(torch.randn(1, 3, D_MODEL))


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="n_heads"):
        get("linear_elu").factory(30, 4)
    with pytest.raises(ValueError, match="feature_dim"):
        get("based").factory(D_MODEL, 2, feature_dim=0)
    with pytest.raises(ValueError, match="window"):
        get("based").factory(D_MODEL, 2, window=-1)
