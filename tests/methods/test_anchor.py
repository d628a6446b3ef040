"""AnchorAttention: oracle rule on its sparsity, reported density, dense at theta = inf, planted stripe, errors."""

from __future__ import annotations

import math

import pytest
import torch

from longattn.masks.core import MaskMod
from longattn.methods.prefill import anchor
from longattn.methods.prefill.anchor import AnchorAttention
from longattn.methods.registry import get
from tests.methods.prefill_checks import SHAPES, check_keeps_everything, check_standard, qkv


@pytest.mark.parametrize(("Sq", "Skv", "Hq", "Hkv", "D", "dtype"), SHAPES)
def test_oracle_and_density(Sq, Skv, Hq, Hkv, D, dtype):
    bs = check_standard(AnchorAttention(theta=2.0, block=32), Sq, Skv, Hq, Hkv, D, dtype)
    if Sq > 64:
        assert bs.mask_density() < 0.9 * bs.density() or bs.density() < 0.45  # really sparse, not causal


@pytest.mark.parametrize(("Sq", "Skv"), [(300, 300), (130, 300)])
def test_infinite_theta_is_dense(Sq, Skv):
    q, k, v = qkv(Sq, Skv)
    check_keeps_everything(AnchorAttention(theta=math.inf, block=32).estimate(q, k), q, k, v)


def test_planted_stripe_is_kept_and_plain_keys_are_not():
    q, k, _ = qkv(512, Hq=2, Hkv=2)
    u = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(5)), dim=0)
    q += 2 * u  # every query leans towards u ...
    k[:, :, 200] = 12 * u  # ... and one key sits far along it: a stripe well above the anchor
    bs = AnchorAttention(theta=1.0, block=64).estimate(q, k)
    allowed = bs.to_dense()[0]
    assert allowed[:, 300:, 200].all()  # the stripe, for every later query
    middle = allowed[:, 448:, 100:180]  # far from the anchor region (first block, local window)
    assert middle.float().mean() < 0.2


def test_registered_and_bad_input():
    assert get("anchor").factory is AnchorAttention
    for kwargs, match in [({"theta": 0}, "theta: expected a positive number"),
                          ({"block": 48}, "block: expected a power of two"),
                          ({"local": 0}, "local: expected an int >= 1")]:
        with pytest.raises(ValueError, match=match):
            AnchorAttention(**kwargs)
    q, k, _ = qkv(100)
    with pytest.raises(ValueError, match=r"local: budget of 128 tokens exceeds the context of 100 tokens"):
        AnchorAttention(block=64, local=128).estimate(q, k)
    with pytest.raises(ValueError, match="k: query heads"):
        AnchorAttention().estimate(q[:, :3], k)


@pytest.mark.parametrize(("Sq", "Skv", "theta"), [(300, 300, 2.0), (130, 300, 2.0), (300, 300, 50.0)])
def test_stripe_bounds_only_skip_work(Sq, Skv, theta, monkeypatch):
    """The stripe mask's block bounds settle whole blocks; without them every block is evaluated token by token.
    Both builds must give the same mask and block classes (theta=50 keeps nearly every stripe: many whole blocks)."""
    q, k, _ = qkv(Sq, Skv)
    bounded = AnchorAttention(theta=theta, block=32).estimate(q, k)
    with_bounds = anchor._stripe_mask
    monkeypatch.setattr(anchor, "_stripe_mask", lambda *args: MaskMod(with_bounds(*args).fn))
    plain = AnchorAttention(theta=theta, block=32).estimate(q, k)
    assert torch.equal(bounded.to_dense(), plain.to_dense())
    assert torch.equal(bounded.block_map()[0], plain.block_map()[0])
