"""MInference block-sparse estimation: selection logic, the kernels on its BlockSparse, and the patched model."""

from __future__ import annotations

import pytest
import torch

from longattn import masks
from longattn.kernels.block_sparse import BlockSparseAttention
from longattn.methods.prefill.minference_block import MInferenceBlockSparse
from longattn.methods.registry import get
from tests.oracle import check_against_oracle

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(S, Hq=4, Hkv=2, D=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, h, S, D, generator=g).to(DEVICE, dtype) for h in (Hq, Hkv, Hkv))


@pytest.mark.parametrize(("Sq", "Skv"), [(300, 300), (1, 300), (130, 300), (64, 64)])
def test_enough_budget_is_exactly_causal(Sq, Skv):
    q, k, _ = _qkv(Skv)
    bs = MInferenceBlockSparse(top_k=1000).estimate(q[:, :, -Sq:], k)
    causal = masks.evaluate(masks.causal(offset=Skv - Sq), torch.zeros(1, 1, 1, 1, dtype=torch.long),
                            torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(Sq).view(1, 1, -1, 1),
                            torch.arange(Skv).view(1, 1, 1, -1))
    assert torch.equal(bs.to_dense().cpu(), causal.expand(1, 4, Sq, Skv))


def test_top_k_keeps_the_diagonal_and_the_strongest_block():
    S, D = 512, 32
    q, k, v = _qkv(S, Hq=2, Hkv=2, D=D)
    k[:, :, 64:128] = q[:, :, -64:].mean(2, keepdim=True) * 4  # block 1 matches the last query block strongly
    bs = MInferenceBlockSparse(top_k=2).estimate(q, k)
    cls_map, _ = bs.block_map()
    last = cls_map[0, :, -1]
    assert (last[:, 7] > 0).all() and (last[:, 1] > 0).all()  # diagonal and the planted block
    assert int((last > 0).sum(-1).max()) <= 3
    assert bs.density() < 0.5


def test_kernel_on_the_estimated_blocks_matches_the_oracle():
    q, k, v = _qkv(333, Hq=4, Hkv=1, D=32, dtype=torch.float16)
    bs = MInferenceBlockSparse(top_k=2).estimate(q, k)

    def run(q, k, v, bias):
        return BlockSparseAttention.apply(q, k, v, None, None, bs, q.shape[-1] ** -0.5)

    check_against_oracle(run, q, k, v, mask=bs)


def test_registered_and_validated():
    assert get("minference_block").factory is MInferenceBlockSparse
    with pytest.raises(ValueError, match="top_k: expected a positive int"):
        MInferenceBlockSparse(top_k=0)
    with pytest.raises(ValueError, match="block: expected a power of two"):
        MInferenceBlockSparse(block=48)


def test_patched_model_dense_budget_equals_dense_and_small_budget_differs():
    transformers = pytest.importorskip("transformers")
    import longattn

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
        with longattn.patch(model, prefill="minference_block", impl="reference", top_k=1000):
            full_budget = model(ids).logits
        with longattn.patch(model, prefill="minference_block", impl="reference", top_k=1, block=32):
            sparse = model(ids).logits
            out = model.generate(ids[:, :100], max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert (full_budget - dense).abs().max() <= 1e-4
    assert (sparse - dense).abs().max() > 1e-3
    assert out.shape == (1, 103)
    with longattn.patch(model, prefill="minference_block", impl="reference"), \
            pytest.raises(ValueError, match="prefill: dynamic prefill methods take unpadded"):
        model(ids[:, :10].repeat(2, 1), attention_mask=torch.tensor([[1] * 10, [0] * 2 + [1] * 8]))
