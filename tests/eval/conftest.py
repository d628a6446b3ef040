"""A tiny random Llama (byte vocabulary) shared by the eval tests."""

import pytest
import torch

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=2048)
    return transformers.LlamaForCausalLM(cfg).eval()
