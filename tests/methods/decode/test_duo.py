"""DuoAttention: retrieval heads keep all, streaming heads sinks + recent; gates optimised and saved once."""

from __future__ import annotations

import json

import pytest
import torch

import longattn
from longattn.hf.cache import LongattnLayer
from longattn.methods.decode.duo import DuoAttention, fit_gates, optimize_gates
from tests.methods.decode.helpers import assert_dense_equivalent, greedy, prompt, tiny_llama


def _gates(tmp_path, gates):
    path = tmp_path / "gates.json"
    path.write_text(json.dumps({"gates": gates}))
    return str(path)


def test_window_covering_everything_equals_dense(tmp_path):
    path = _gates(tmp_path, [[0.9, 0.1], [0.2, 0.8]])
    assert_dense_equivalent("duo", {"gates_path": path, "sinks": 4, "recent": 60})


def test_kept_set_hand_worked_with_different_head_lengths(tmp_path):
    policy = DuoAttention(_gates(tmp_path, [[0.9, 0.1]]), sparsity=0.5, sinks=2, recent=3)
    layer = LongattnLayer()
    k = torch.randn(1, 2, 10, 4)
    layer.update(k, k)
    policy.apply_compress(0, layer)
    assert layer.kept_positions(0, 0) == list(range(10))  # retrieval head
    assert layer.kept_positions(0, 1) == [0, 1, 7, 8, 9]  # streaming head
    layer.update(k[:, :, :1], k[:, :, :1])
    policy.after_step(0, torch.randn(1, 2, 1, 4), layer)
    assert layer.lengths.tolist() == [[11, 5]] and layer.kept_positions(0, 1) == [0, 1, 8, 9, 10]


def test_fit_gates_reaches_the_closed_form():
    """argmin over [0, 1] of (1 - a)^2 d + lam a is clamp(1 - lam / (2 d), 0, 1)."""
    d = torch.tensor([0.001, 0.02, 0.05, 1.0])
    want = (1 - 0.05 / (2 * d)).clamp(0, 1)
    assert torch.allclose(fit_gates(d, 0.05, steps=600), want, atol=1e-2)


def test_optimize_gates_saves_a_file_the_policy_uses(tmp_path):
    model = tiny_llama()
    path = tmp_path / "duo.json"
    gates = optimize_gates(model, path, samples=1, length=64, sinks=4, recent=8, steps=50)
    saved = json.loads(path.read_text())
    assert torch.equal(torch.tensor(saved["gates"]), gates) and gates.shape == (2, 2)
    assert ((gates >= 0) & (gates <= 1)).all() and all(e > 0 for row in saved["errors"] for e in row)
    with longattn.patch(model, decode="duo", impl="reference",
                        decode_config={"gates_path": str(path), "sinks": 4, "recent": 8}) as m:
        assert greedy(m, prompt(40), new=3).shape == (1, 43)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="gates_path: no DuoAttention gate file at .*optimize_gates"):
        DuoAttention(str(tmp_path / "missing.json"))
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"gates_path: gates of shape \(1, 2\) do not fit this model"):
        longattn.patch(model, decode="duo", decode_config={"gates_path": _gates(tmp_path, [[0.5, 0.5]])})
    with pytest.raises(ValueError, match="length: 64 tokens leave nothing to drop"):
        optimize_gates(model, tmp_path / "x.json", length=64)
