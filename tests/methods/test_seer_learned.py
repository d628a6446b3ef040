"""Learned SeerAttention gate: untrained gates equal the pooled estimate, distillation lowers the KL, weights
round-trip through safetensors, oracle rule, density, dense at threshold 0, bad input."""

from __future__ import annotations

import pytest
import torch

from longattn.methods.prefill.base import pooled_block_scores
from longattn.methods.prefill.seer_learned import (
    SeerGates,
    SeerLearned,
    block_attention_target,
    distill,
)
from longattn.methods.registry import get
from tests.methods.prefill_checks import (
    ORACLE_GRID,
    ORACLE_IDS,
    check_density,
    check_keeps_everything,
    check_oracle,
    qkv,
)


class _WithConfig:
    """Stands in for a transformers model (anything with a config)."""

    config = None


def _samples(S: int = 256):
    q, k, _ = qkv(S, Hq=4, Hkv=2)
    u = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(4)), dim=0)
    k[:, :, 70] += 10 * u  # a hot key the mean-pooled estimate underrates
    return [(0, q + 2 * u, k), (1, q, k)]


def test_untrained_gate_is_the_mean_pooled_estimate():
    q, k, _ = qkv(300)
    gates = SeerGates({0: (4, 32)})
    assert torch.allclose(gates(q, k, 0).exp(), pooled_block_scores(q, k, (64, 64)), atol=1e-6)


def test_distillation_lowers_the_kl_and_weights_round_trip(tmp_path):
    samples = _samples()
    path = tmp_path / "gates.safetensors"
    gates = distill(samples, steps=8, lr=2e-2, path=path)
    assert gates.history[-1] < 0.8 * gates.history[0], gates.history
    q, k = samples[0][1], samples[0][2]
    a = SeerLearned(path, threshold=0.05).estimate(q, k)
    b = SeerLearned(gates, threshold=0.05).estimate(q, k)
    assert torch.equal(a.to_dense(), b.to_dense())
    target = block_attention_target(q, k, (64, 64))
    assert torch.allclose(target.sum(-1), torch.ones(1, 4, 4), atol=1e-5)


@pytest.mark.parametrize(("Sq", "Skv", "Hkv", "dtype", "D"), ORACLE_GRID, ids=ORACLE_IDS)
def test_oracle_rule_and_density(Sq, Skv, Hkv, dtype, D):
    q, k, v = qkv(Sq, Skv, Hkv=Hkv, D=D, dtype=dtype)
    m = SeerLearned(threshold=0.05)
    bs = m.estimate(q, k, layer=2)
    check_oracle(bs, q, k, v)
    check_density(bs, m.last_density)


def test_threshold_zero_is_dense():
    q, k, v = qkv(300)
    check_keeps_everything(SeerLearned(threshold=0).estimate(q, k), q, k, v)


def test_bad_input(tmp_path):
    q, k, _ = qkv(300)
    assert get("seer_learned").factory is SeerLearned
    gates = SeerGates({0: (4, 32)})
    with pytest.raises(ValueError, match="layer: no gate for layer 3; gates exist for layers \\['0'\\]"):
        SeerLearned(gates).estimate(q, k, layer=3)
    with pytest.raises(ValueError, match="q: gate expects 4 heads of dim 32, got 2 heads of dim 32"):
        SeerLearned(gates).estimate(q[:, :2], k)
    with pytest.raises(TypeError, match="weights: expected a safetensors path or SeerGates"):
        SeerLearned(weights=3)
    with pytest.raises(ValueError, match="top_k: budget of 9 kv blocks exceeds the context of 5 kv blocks"):
        SeerLearned(top_k=9).estimate(q, k)
    with pytest.raises(ValueError, match="steps: expected an int >= 0"):
        distill(_samples(), steps=-1)
    with pytest.raises(ValueError, match="lr: expected a positive learning rate"):
        distill(_samples(), lr=0)
    with pytest.raises(ValueError, match="model_or_qk_samples: expected at least one"):
        distill([])
    with pytest.raises(ValueError, match="input_ids: a model needs calibration token ids"):
        distill(_WithConfig())  # a model without input_ids
