"""Static patterns: paper-default knobs, and the per-head window pattern under its new name ``moa_windows``."""

from __future__ import annotations

import pytest
import torch

from longattn import masks
from longattn.methods.registry import get
from tests.hf.test_patch import _ids, tiny


def test_paper_defaults():
    assert get("streaming").factory().name == "sinks(4, 1020)"  # StreamingLLM: 4 sinks, 1024-token cache
    assert get("sliding_window").factory().name == "sliding_window(4096)"  # Mistral 7B
    q, kv = torch.arange(5000).view(-1, 1), torch.arange(5000).view(1, -1)
    zero = torch.zeros(1, 1, dtype=torch.long)
    kept = masks.evaluate(masks.sinks(), zero, zero, q, kv)
    assert int(kept[4999].sum()) == 4 + 1020


def test_moa_windows_pattern_through_patch():
    pytest.importorskip("transformers")
    import longattn

    model = tiny("llama")
    ids = _ids(40, batch=1)
    with torch.no_grad():
        with longattn.patch(model, prefill="moa_windows", impl="reference", windows=[5, 9, 40, 40]):
            ours = model(ids).logits
        with longattn.patch(model, prefill="sliding_window", impl="reference", window=40):
            dense = model(ids).logits
    assert get("moa_windows").family == "pattern" and get("moa").family == "prefill"
    assert (ours - dense).abs().max() > 1e-3
