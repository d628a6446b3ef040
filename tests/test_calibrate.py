"""`longattn calibrate`: each calibration writes a JSON file the method then loads, on a tiny offline model."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from longattn import cli
from longattn.methods.registry import get
from tests.eval.chartok import ByteTokenizer


@pytest.fixture
def tiny(monkeypatch):
    """The CLI's model loader answers with a tiny random byte-level Llama."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg).eval()
    monkeypatch.setattr("longattn.hf.models.load_model", lambda name: (model, ByteTokenizer()))
    return model


@pytest.fixture
def small_candidates(monkeypatch):
    """MInference's default candidates need 8k prompts; the search itself is tested in tests/methods."""
    from longattn.methods.prefill import minference_search as ms

    small = ({"pattern": "ashape", "knobs": {"n_init": 4, "n_local": 64}},
             {"pattern": "vertical_slash", "knobs": {"vertical_size": 32, "slash_size": 64}},
             {"pattern": "block", "knobs": {"top_k": 2}})
    real = ms.search
    monkeypatch.setattr(ms, "search", lambda model, ids: real(model, ids, small))


@pytest.mark.parametrize(("method", "knob", "extra"), [("duo", "gates_path", ["--sinks", "4", "--recent", "16"]),
                                                       ("minference", "config", []), ("moa", "config", [])])
def test_writes_a_file_the_method_loads(tiny, small_candidates, tmp_path, capsys, method, knob, extra):
    out = tmp_path / f"{method}.json"
    assert cli.main(["calibrate", method, "--out", str(out), "--length", "512", *extra]) == 0
    assert f"use it as {method}:{knob}={out}" in capsys.readouterr().out
    assert json.loads(out.read_text())  # valid, non-empty JSON
    instance = get(method).factory(**{knob: str(out)})
    if method == "duo":
        instance.bind(tiny.config)  # gates shaped [layers, kv heads] of this model
        assert tuple(instance.gates.shape) == (2, 2)
        saved = json.loads(out.read_text())
        assert (saved["sinks"], saved["recent"]) == (4, 16)  # the window the policy will use


def test_unknown_method_is_refused(tiny, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["calibrate", "hyper", "--out", str(tmp_path / "x.json")])
