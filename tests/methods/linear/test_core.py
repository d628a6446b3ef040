"""The shared PyTorch core (chunked decayed linear attention) against the naive fp64 recurrence, and the
layer-specific pieces: Based's Taylor map, Hedgehog's distillation, Aaren's softmax semantics."""

from __future__ import annotations

import pytest
import torch

from longattn.methods.linear.aaren import Aaren
from longattn.methods.linear.base import linear_attention_step, linear_attention_torch
from longattn.methods.linear.based import taylor_features
from longattn.methods.linear.hedgehog import Hedgehog
from tests.oracle import assert_close_to_reference


def naive(q, k, v, decay, gate, scale, state):
    """The recurrence one token at a time (the oracle when run in fp64)."""
    B, H, S, _ = q.shape
    log_a = torch.zeros(B, H, S, dtype=q.dtype)
    if decay is not None:
        log_a = log_a + decay.to(q.dtype).log().view(1, H, 1)
    if gate is not None:
        log_a = log_a + gate
    outs = []
    for t in range(S):
        o, state = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, log_a[:, :, t], scale)
        outs.append(o)
    return torch.stack(outs, 2), state


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("S", [1, 127, 300])
@pytest.mark.parametrize("mode", ["plain", "decay", "gate", "decay+gate+state"])
def test_chunked_core_matches_the_recurrence(mode, S, dtype):
    g = torch.Generator().manual_seed(S)
    B, H, Dk, Dv = 2, 3, 8, 5
    q, k = (torch.randn(B, H, S, Dk, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    v = torch.randn(B, H, S, Dv, generator=g, dtype=torch.float64)
    decay = torch.tensor([0.5, 0.9, 1.0], dtype=torch.float64) if "decay" in mode else None
    gate = -torch.rand(B, H, S, generator=g, dtype=torch.float64) * 0.3 if "gate" in mode else None
    state = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64) if "state" in mode else None
    leaves = [t for t in (q, k, v, gate, state) if t is not None]

    def run(fn, cast):
        xs = [t.to(cast).requires_grad_(True) for t in leaves]
        it = iter(xs)
        qq, kk, vv = next(it), next(it), next(it)
        gg = next(it) if gate is not None else None
        st = next(it) if state is not None else torch.zeros(B, H, Dk, Dv, dtype=cast)
        o, final = fn(qq, kk, vv, decay, gg, 0.7, st)
        grads = torch.autograd.grad((o * dout.to(cast)).sum() + final.sum(), xs)
        return o, final, grads

    dout = torch.randn(B, H, S, Dv, generator=g, dtype=torch.float64)
    chunked = lambda q, k, v, d, gt, sc, st: linear_attention_torch(q, k, v, decay=d, gate=gt, scale=sc,
                                                                    initial_state=st, chunk=32)
    fo, fs, fg = run(chunked, dtype)
    ro, rs, rg = run(naive, torch.float64)
    bo, bs, bg = run(naive, dtype)
    assert_close_to_reference(fo, ro, bo, what="o")
    assert_close_to_reference(fs, rs, bs, what="final_state")
    for i, (a, r, b) in enumerate(zip(fg, rg, bg, strict=True)):
        assert_close_to_reference(a, r, b, grad=True, what=f"grad[{i}]")


def test_core_rejects_bad_shapes_and_decays():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="initial_state: expected shape"):
        linear_attention_torch(q, q, q, initial_state=torch.zeros(1, 2, 4, 3))
    with pytest.raises(ValueError, match="decay"):
        linear_attention_torch(q, q, q, decay=torch.tensor([0.5, 1.01]))
    with pytest.raises(ValueError, match="decay: expected shape"):
        linear_attention_torch(q, q, q, decay=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="gate: expected shape"):
        linear_attention_torch(q, q, q, gate=torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="k, v"):
        linear_attention_torch(q, q[..., :3], q)


def test_taylor_map_is_the_second_order_expansion_of_exp():
    q, k = torch.randn(7, 6, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)
    s = (q * k).sum(-1) / 6 ** 0.5
    torch.testing.assert_close((taylor_features(q) * taylor_features(k)).sum(-1), 1 + s + s ** 2 / 2)


def test_aaren_is_softmax_attention_of_a_learned_query():
    torch.manual_seed(0)
    layer = Aaren(16, 2).double()
    x = torch.randn(2, 50, 16, dtype=torch.float64)
    k, v = layer.kv(x).view(2, 50, 2, 2, 8).permute(2, 0, 3, 1, 4)
    scores = torch.einsum("bhsd,hd->bhs", k, layer.query) / 8 ** 0.5
    causal = torch.ones(50, 50, dtype=torch.bool).tril()
    w = scores[:, :, None, :].expand(-1, -1, 50, -1).masked_fill(~causal, float("-inf")).softmax(-1)
    ref = layer.o_proj((w @ v).transpose(1, 2).reshape(2, 50, 16))
    base = layer.float()(x.float())
    assert_close_to_reference(layer.double()(x), ref, base)


def test_hedgehog_distillation_learns_to_mimic_softmax():
    torch.manual_seed(0)
    layer = Hedgehog(32, 2, feature_dim=16)
    layer.q_proj.weight.data *= 5  # a peaked teacher, far from what the identity-initialised map gives
    x = torch.randn(4, 48, 32)
    opt = torch.optim.Adam([layer.fmap], lr=3e-2)
    first = float(layer.distillation_loss(x).detach())
    for _ in range(60):
        opt.zero_grad()
        loss = layer.distillation_loss(x)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first - 0.25, (first, float(loss.detach()))
