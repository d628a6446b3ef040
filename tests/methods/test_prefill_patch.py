"""Dynamic prefill methods end to end through ``longattn.patch`` on a tiny random Llama: whole-context budgets
reproduce dense logits, small budgets change them, and the offline steps (pattern search, gate distillation) run
from the model itself."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longattn  # noqa: E402
from longattn.methods.prefill import minference_search as ms  # noqa: E402
from longattn.methods.prefill.seer_learned import distill  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(1))


def _logits(model, **patch_kwargs):
    with torch.no_grad(), longattn.patch(model, impl="reference", **patch_kwargs):
        return model(IDS).logits


def test_flexprefill_full_and_sparse(model):
    with torch.no_grad():
        dense = model(IDS).logits
    assert (_logits(model, prefill="flexprefill", gamma=1.0, block=64) - dense).abs().max() <= 1e-4
    # tau=1 forces the query-aware pattern (sqrt JS <= sqrt(ln 2)): near-uniform attention of a random model keeps
    # a few kept columns in every block, so its vertical-slash pattern would cover every block
    assert (_logits(model, prefill="flexprefill", gamma=0.2, tau=1.0, block=64) - dense).abs().max() > 1e-3


def test_minference_search_from_the_model_then_patch(model, tmp_path):
    whole = [{"pattern": "ashape", "knobs": {"n_init": 0, "n_local": 300}},
             {"pattern": "vertical_slash", "knobs": {"vertical_size": 300, "slash_size": 300}}]
    cfg = ms.search(model, IDS, whole, model_name="tiny-llama")
    assert sorted(cfg["layers"]) == ["0", "1"] and all(len(h) == 4 for h in cfg["layers"].values())
    path = tmp_path / "tiny.json"
    ms.save_config(cfg, path)
    with torch.no_grad():
        dense = model(IDS).logits
    assert (_logits(model, prefill="minference", config=str(path)) - dense).abs().max() <= 1e-4
    small = ms.search(model, IDS, [{"pattern": "ashape", "knobs": {"n_init": 4, "n_local": 32}},
                                   {"pattern": "block", "knobs": {"top_k": 1}}])
    assert (_logits(model, prefill="minference", config=small) - dense).abs().max() > 1e-3


def test_seer_gates_distilled_from_the_model_then_patch(model, tmp_path):
    path = tmp_path / "gates.safetensors"
    gates = distill(model, IDS, steps=3, lr=1e-2, path=path)
    assert sorted(gates.gates) == ["0", "1"] and gates.history[-1] < gates.history[0]
    with torch.no_grad():
        dense = model(IDS).logits
    assert (_logits(model, prefill="seer_learned", weights=str(path), threshold=0.0) - dense).abs().max() <= 1e-4
    assert (_logits(model, prefill="seer_learned", weights=str(path), top_k=1) - dense).abs().max() > 1e-3
