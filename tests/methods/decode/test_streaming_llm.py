"""StreamingLLM: sinks + recent window, at prefill and at every decoding step."""

from __future__ import annotations

import pytest
import torch

from longattn.hf.cache import LongattnLayer
from longattn.methods.decode.streaming_llm import StreamingLLM
from tests.methods.decode.helpers import assert_dense_equivalent


def test_budget_covering_everything_equals_dense():
    assert_dense_equivalent("streaming_llm", {"budget": 60, "sinks": 4})


def test_kept_set_hand_worked():
    policy = StreamingLLM(budget=5, sinks=2)
    layer = LongattnLayer()
    k = torch.randn(1, 2, 10, 4)
    layer.update(k, k)
    policy.apply_compress(0, layer)
    assert layer.kept_positions(0, 1) == [0, 1, 7, 8, 9]
    layer.update(k[:, :, :1], k[:, :, :1])  # token 10 arrives: 7 drops out of the window
    policy.after_step(0, torch.randn(1, 4, 1, 4), layer)
    assert layer.kept_positions(0, 0) == [0, 1, 8, 9, 10]
    assert torch.equal(layer.keys[0, 0, 2], k[0, 0, 8])  # the slots moved with their tokens


def test_bad_knobs():
    with pytest.raises(ValueError, match="budget: expected an int >= 1, got 0"):
        StreamingLLM(budget=0)
    with pytest.raises(ValueError, match="sinks: 8 sink tokens leave no room"):
        StreamingLLM(budget=8, sinks=8)
