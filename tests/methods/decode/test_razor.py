"""RazorAttention: retrieval heads by induction/echo scores; others sinks + recent + a compensation token."""

from __future__ import annotations

import json
import math

import pytest
import torch

import longattn
from longattn.hf.cache import LongattnLayer, attend_cached
from longattn.methods.decode.razor import RazorAttention, head_scores
from tests.methods.decode.helpers import assert_dense_equivalent, greedy, prompt, tiny_llama


def _scores(tmp_path, induction, echo):
    path = tmp_path / "razor.json"
    path.write_text(json.dumps({"induction": induction, "echo": echo}))
    return str(path)


def test_window_covering_everything_equals_dense(tmp_path):
    path = _scores(tmp_path, [[0.9, 0.1], [0.2, 0.3]], [[0.1, 0.1], [0.1, 0.2]])
    assert_dense_equivalent("razor", {"scores_path": path, "recent": 60})


def test_compensation_token_hand_worked(tmp_path):
    """Head 0 is protected (top induction); head 1 keeps sink 0 + recent {4, 5} and one token holding the mean
    key/value of {1, 2, 3} whose softmax weight counts three times: with keys all zero the read equals the plain
    average of all six values, as if nothing had been dropped."""
    policy = RazorAttention(_scores(tmp_path, [[0.9, 0.1]], [[0.0, 0.0]]), induction_ratio=0.5, echo_ratio=0.0,
                            sinks=1, recent=2)
    layer = LongattnLayer()
    k = torch.zeros(1, 2, 6, 4)
    v = torch.randn(1, 2, 6, 4)
    layer.update(k, v)
    policy.apply_compress(0, layer)
    assert layer.lengths.tolist() == [[6, 4]]
    assert layer.kept_positions(0, 1) == [0, 4, 5, 0]
    assert torch.allclose(layer.values[0, 1, 3], v[0, 1, 1:4].mean(0))
    assert math.isclose(float(layer.slot_state["logit_bias"][0, 1, 3]), math.log(3), rel_tol=1e-6)
    layer.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    out = attend_cached(torch.randn(1, 2, 1, 4), layer)
    want = torch.cat([v, torch.zeros(1, 2, 1, 4)], 2).mean(2)
    assert torch.allclose(out[:, :, 0], want, atol=1e-6)


def test_head_scores_find_induction_heads(tmp_path):
    model = tiny_llama()
    data = head_scores(model, tmp_path / "s.json", samples=1, length=16)
    assert len(data["induction"]) == 2 and len(data["induction"][0]) == 2
    with longattn.patch(model, decode="razor", impl="reference",
                        decode_config={"scores_path": str(tmp_path / "s.json"), "recent": 8}) as m:
        assert greedy(m, prompt(40), new=3).shape == (1, 43)


def test_missing_scores_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="scores_path: no RazorAttention head-score file"):
        RazorAttention(str(tmp_path / "nope.json"))
