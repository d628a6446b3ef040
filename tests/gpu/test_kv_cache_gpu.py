"""The KV cache on CUDA: a 128k-token SnapKV generation at budget 2048 holds <= 1/40 of the dense KV bytes
(measured from the held tensors and from the CUDA allocator); offloaded values give the same tokens."""

from __future__ import annotations

import pytest
import torch
import transformers

import longattn
from longattn.hf.compat import cache_kwargs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(max_len: int):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=max_len)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval().to("cuda", torch.float16)


def _greedy(model, ids, new, cache):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              **cache_kwargs(model, cache))


def test_snapkv_128k_at_2k_budget_holds_a_fortieth_of_dense():
    S = 131072
    model = _model(S + 64)
    ids = torch.randint(0, 1000, (1, S), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    dense = transformers.DynamicCache(config=model.config)
    _greedy(model, ids, 8, dense)
    dense_bytes = sum(layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
                      for layer in dense.layers)
    del dense
    torch.cuda.empty_cache()
    handle = longattn.patch(model, decode="snapkv", decode_config={"budget": 2048})
    try:
        before = torch.cuda.memory_allocated()
        cache = handle.cache()
        _greedy(model, ids, 8, cache)
        held = cache.bytes_by_device()
        allocator = torch.cuda.memory_allocated() - before  # what the cache (and nothing else) still holds
    finally:
        handle.restore()
    ours = sum(held.values())
    print(f"dense {dense_bytes} B, snapkv {held} (allocator delta {allocator} B), ratio 1/{dense_bytes / ours:.1f}")
    assert set(held) == {"cuda:0"}
    assert ours * 40 <= dense_bytes
    assert allocator * 40 <= dense_bytes


@pytest.mark.parametrize("offload", ["values", "all"])
def test_offloaded_cache_generates_the_same_tokens(offload):
    model = _model(4096)
    ids = torch.randint(0, 1000, (1, 3000), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    handle = longattn.patch(model, decode="snapkv", decode_config={"budget": 512})
    try:
        on_gpu = _greedy(model, ids, 16, handle.cache())
        cache = handle.cache(offload=offload)
        offloaded = _greedy(model, ids, 16, cache)
    finally:
        handle.restore()
    assert torch.equal(on_gpu, offloaded)
    held = cache.bytes_by_device()
    assert held["cpu"] > 0 and (offload == "all") == (held.get("cuda:0", 0) < held["cpu"] / 10)
