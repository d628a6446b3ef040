"""KIVI: per-channel keys / per-token values at int8 and int4, full-precision residual window."""

from __future__ import annotations

import pytest
import torch

from longattn.hf.quant_cache import QuantizedLayer, pack4, quantize, unpack4
from longattn.methods.decode.kivi import KIVI
from tests.methods.decode.helpers import assert_dense_equivalent


def test_residual_covering_everything_equals_dense():
    assert_dense_equivalent("kivi", {"bits": 4, "group": 8, "residual": 64})


def test_pack4_roundtrip():
    codes = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    assert torch.equal(unpack4(pack4(codes)), codes)


@pytest.mark.parametrize("bits", [8, 4])
def test_error_within_half_a_step(bits):
    """Every dequantised element lies within half a quantisation step of the original; residual tokens exact."""
    g = torch.Generator().manual_seed(bits)
    k, v = torch.randn(2, 3, 45, 16, generator=g) * 3, torch.randn(2, 3, 45, 16, generator=g)
    layer = QuantizedLayer(bits, group=8, residual=5)
    layer.update(k[:, :, :31], v[:, :, :31])
    for i in range(31, 45):
        layer.update(k[:, :, i:i + 1], v[:, :, i:i + 1])
    kd, vd = layer.kv()
    t = layer.qk.shape[2]
    assert t == 40 and layer.keys.shape[2] == 5  # quantised in whole groups, residual >= 5 kept exact
    assert torch.equal(kd[:, :, t:], k[:, :, t:])
    kstep = layer.k_scale.repeat_interleave(8, 2)  # per (group of 8 tokens, channel)
    vstep = layer.v_scale.repeat_interleave(8, -1)  # per (token, group of 8 channels)
    assert ((kd[:, :, :t] - k[:, :, :t]).abs() <= kstep / 2 * (1 + 1e-5) + 1e-6).all()
    assert ((vd[:, :, :t] - v[:, :, :t]).abs() <= vstep / 2 * (1 + 1e-5) + 1e-6).all()
    assert (kstep <= (k[:, :, :t].amax() - k[:, :, :t].amin()) / (2**bits - 1) + 1e-6).all()
    assert layer.qk.dtype == torch.uint8 and layer.qk.shape[-1] == (8 if bits == 4 else 16)


def test_quantize_constant_input_is_exact():
    x = torch.full((1, 4, 3), 2.5)
    codes, scale, lo = quantize(x, 4, 1)
    assert torch.equal(codes.float() * scale + lo, x)


def test_bad_knobs():
    with pytest.raises(ValueError, match=r"bits: expected one of \(4, 8\), got 2"):
        KIVI(bits=2)
    with pytest.raises(ValueError, match="group: 5 must divide head_dim 16"):
        QuantizedLayer(4, group=5).update(torch.zeros(1, 1, 2, 16), torch.zeros(1, 1, 2, 16))
