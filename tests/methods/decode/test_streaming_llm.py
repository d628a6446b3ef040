"""StreamingLLM: sinks + recent window, at prefill and at every decoding step."""

from __future__ import annotations

import pytest
import torch

from longattn.methods.decode.streaming_llm import StreamingLLM
from tests.methods.decode.helpers import assert_dense_equivalent


def test_budget_covering_everything_equals_dense():
    assert_dense_equivalent("streaming_llm", {"budget": 60, "sinks": 4})


def test_kept_set_hand_worked():
    """Budget 5 with 2 sinks: the ring keeps positions 0, 1 and the last 3; token 10 overwrites 7's slot in place,
    and the step that reads it sees exactly 5 tokens (the authors' cache makes room before the step)."""
    policy = StreamingLLM(budget=5, sinks=2)
    layer = policy.make_layer(0)
    k = torch.randn(1, 2, 10, 4)
    layer.update(k, k)
    policy.apply_compress(0, layer)
    assert sorted(layer.kept_positions(0, 1)) == [0, 1, 7, 8, 9]
    new = torch.randn(1, 2, 1, 4)
    layer.update(new, new)  # token 10 arrives: 7 drops out of the window
    assert sorted(layer.kept_positions(0, 0)) == [0, 1, 8, 9, 10] and layer.capacity == 5
    assert torch.equal(layer.keys[0, 0, 4], new[0, 0, 0])  # written where 7 was: ring slot 2 + (10 - 2) % 3


def test_stored_prompt_kept_set():
    """``compress`` (the kept set of a stored prompt, as the eval's accounting uses it) is sinks + last tokens."""
    pos = torch.arange(10).view(1, 1, -1)
    keep = StreamingLLM(budget=5, sinks=2).compress(0, None, None, None, pos)
    assert keep[0, 0].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]


def test_bad_knobs():
    with pytest.raises(ValueError, match="budget: expected an int >= 1, got 0"):
        StreamingLLM(budget=0)
    with pytest.raises(ValueError, match="sinks: 8 sink tokens leave no room"):
        StreamingLLM(budget=8, sinks=8)
