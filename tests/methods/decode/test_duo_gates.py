"""DuoAttention's end-to-end gate optimisation: mixed attention over a captured prefix, gates trained against the
full model's final hidden states at the answer positions, saved as a file the policy loads."""

from __future__ import annotations

import json

import pytest
import torch

import longattn
from longattn.methods.decode.calibration import capture_qkv
from longattn.methods.decode.duo_gates import gated_attention, optimize_gates, train_gates, window_masks
from tests.methods.decode.helpers import greedy, prompt, tiny_llama


def test_window_masks_hand_worked():
    causal, window = window_masks(6, 8, sinks=2, recent=3)
    assert causal.tolist() == [[True] * 7 + [False], [True] * 8]
    assert window.tolist() == [[True, True, False, False, True, True, True, False],
                               [True, True, False, False, False, True, True, True]]


def _answer_hidden(model, ids, split, alpha, sinks, recent):
    prefix = [(k, v) for _, k, v in capture_qkv(model, ids[:, :split])]
    positions = torch.arange(split, ids.shape[1])[None]
    with gated_attention(model, prefix, alpha, sinks, recent), torch.no_grad():
        return model.base_model(ids[:, split:], position_ids=positions, use_cache=False).last_hidden_state


def test_all_gates_one_is_the_full_model_and_zero_differs():
    """Gates 1 over a captured prefix reproduce one plain forward at the answer positions; gates 0 do not (the
    window dropped tokens); the weights are left trainable as they were."""
    model = tiny_llama()
    ids = prompt(48)
    with torch.no_grad():
        plain = model.base_model(ids).last_hidden_state[:, 40:]
    full = _answer_hidden(model, ids, 40, torch.ones(2, 2), sinks=2, recent=4)
    stream = _answer_hidden(model, ids, 40, torch.zeros(2, 2), sinks=2, recent=4)
    assert torch.allclose(full, plain, atol=1e-5)
    assert (stream - plain).abs().max() > 1e-2
    assert all(p.requires_grad for p in model.parameters())


def test_gate_stays_high_for_the_head_the_answer_needs():
    """Kv head 1 writes nothing (its query heads' output projection is zeroed): L1 drives its gates to 0, while
    kv head 0, whose streaming output changes the answer positions' hidden states, keeps gates near 1."""
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 32:] = 0  # query heads 2, 3 (kv head 1) of head_dim 16
    ids = prompt(64, batch=2)
    gates, loss = train_gates(model, ids, answer=8, sinks=2, recent=4, lam=0.05, steps=100, lr=0.05)
    assert gates[:, 1].max() == 0 and gates[:, 0].min() > 0.9, gates
    assert 0 <= loss < 0.01


def test_optimize_gates_saves_a_file_the_policy_uses(tmp_path):
    model = tiny_llama()
    path = tmp_path / "duo.json"
    gates = optimize_gates(model, path, samples=1, length=128, answer=4, sinks=4, recent=8, steps=20)
    saved = json.loads(path.read_text())
    assert torch.equal(torch.tensor(saved["gates"]), gates) and gates.shape == (2, 2)
    assert ((gates >= 0) & (gates <= 1)).all() and saved["optimisation"] == "end-to-end"
    assert (saved["sinks"], saved["recent"], saved["answer"]) == (4, 8, 4)
    with longattn.patch(model, decode="duo", impl="reference",
                        decode_config={"gates_path": str(path), "sinks": 4, "recent": 8}) as m:
        assert greedy(m, prompt(40), new=3).shape == (1, 43)


def test_errors(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="length: 512 tokens put the key inside the streaming window"):
        optimize_gates(model, tmp_path / "x.json", length=512)
    with pytest.raises(ValueError, match="answer: expected an int >= 1, got 0"):
        optimize_gates(model, tmp_path / "x.json", answer=0)
