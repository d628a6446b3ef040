"""LongattnCache: per-head kept tokens read exactly, bytes measured, offload failing loudly, memory at a budget."""

from __future__ import annotations

import pytest
import torch
import transformers

import longattn
from longattn.hf import cache as cache_mod
from longattn.hf.cache import LongattnLayer, attend_cached
from longattn.kernels.reference import reference_attention
from longattn.masks.core import MaskMod
from tests.methods.decode.helpers import greedy, prompt, tiny_llama
from tests.oracle import assert_close_to_reference

SHAPES = [(1, 1, 1), (2, 4, 127), (1, 4, 300), (1, 8, 33)]  # (batch, GQA group, prompt length)


def _evicted_layer(B, Hkv, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, Hkv, S, D, generator=g).to(dtype), torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    layer = LongattnLayer()
    layer.update(k, v)
    keep = torch.rand(B, Hkv, S, generator=g) < torch.linspace(0.2, 0.9, Hkv)[None, :, None]
    keep[..., -1] = True  # every head keeps its newest token (so every query row attends something)
    layer.evict(keep)
    return layer, k, v, keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B,group,S", SHAPES, ids=[f"b{b}-g{g}-s{s}" for b, g, s in SHAPES])
@pytest.mark.parametrize("new", [1, 5], ids=["decode", "chunk"])
def test_per_head_lengths_read_equals_masked_reference(B, group, S, new, dtype):
    """After evicting a different set per head (different lengths), then appending ``new`` tokens, attend_cached
    equals full attention over all tokens with the mask 'kept or new, and causal'."""
    Hkv, D = 2, 16
    layer, k, v, keep = _evicted_layer(B, Hkv, S, D, dtype, seed=S + group)
    assert len({int(n) for n in layer.lengths.flatten()}) > 1 or S == 1  # heads really hold different counts
    g = torch.Generator().manual_seed(1)
    kn, vn = torch.randn(B, Hkv, new, D, generator=g).to(dtype), torch.randn(B, Hkv, new, D, generator=g).to(dtype)
    layer.update(kn, vn)
    q = torch.randn(B, Hkv * group, new, D, generator=g).to(dtype)
    kept = torch.cat([keep, torch.ones(B, Hkv, new, dtype=torch.bool)], -1)

    def kept_or_new(b, h, qi, kv):
        return kept[b, h // group, kv]

    mask = MaskMod(kept_or_new)
    kf, vf = torch.cat([k, kn], 2), torch.cat([v, vn], 2)
    out = attend_cached(q, layer)
    ref = reference_attention(q.double(), kf.double(), vf.double(), mask=mask, causal=True)[0]
    low = reference_attention(q, kf, vf, mask=mask, causal=True, compute_dtype=dtype)[0]
    assert_close_to_reference(out, ref, low)


def test_padding_mask_is_applied_by_position():
    layer, k, v, keep = _evicted_layer(1, 2, 20, 8, torch.float32, seed=3)
    layer.update(k[:, :, :1], v[:, :, :1])
    q = torch.randn(1, 2, 1, 8)
    pad = torch.ones(1, 1, 1, 21, dtype=torch.bool)
    pad[..., :10] = False  # positions 0-9 are padding
    kept = torch.cat([keep, torch.ones(1, 2, 1, dtype=torch.bool)], -1)
    kept[..., :10] = False
    out = attend_cached(q, layer, attention_mask=pad)
    ref = reference_attention(q.double(), torch.cat([k, k[:, :, :1]], 2).double(), torch.cat([v, v[:, :, :1]], 2)
                              .double(), mask=MaskMod(lambda b, h, qi, kv: kept[b, h, kv]), causal=True)[0]
    assert_close_to_reference(out, ref, ref.float())


def test_bytes_by_device_is_the_sum_of_held_tensors():
    model = tiny_llama()
    handle = longattn.patch(model, decode="snapkv", impl="reference", decode_config={"budget": 16, "window": 4})
    try:
        cache = handle.cache()
        greedy(model, prompt(40), new=4, past_key_values=cache)
        want = sum(t.nbytes for layer in cache.layers for t in layer.tensors())
        assert cache.bytes_by_device() == {"cpu": want}
        assert want < 40 * 2 * 2 * 16 * 4 * 2  # below the dense K/V of the two layers
    finally:
        handle.restore()


def test_offload_short_of_cpu_memory_fails_loudly_and_leaves_the_cache(monkeypatch):
    layer = LongattnLayer(offload="all")
    k = torch.randn(1, 2, 8, 4)
    layer.update(k, k)
    before = [t.clone() for t in (layer.keys, layer.values, layer.pos, layer.lengths)]
    monkeypatch.setattr(cache_mod, "available_cpu_bytes", lambda: 100)
    with pytest.raises(MemoryError, match="offload: cannot allocate .* MiB of CPU memory"):
        layer.update(torch.randn(1, 2, 200, 4), torch.randn(1, 2, 200, 4))
    after = (layer.keys, layer.values, layer.pos, layer.lengths)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) and layer.seen == 8
    assert layer.keys.device.type == "cpu" and layer.values.device.type == "cpu"


def test_bad_cache_options():
    with pytest.raises(ValueError, match="offload: expected one of"):
        LongattnLayer(offload="disk")
    model = tiny_llama()
    with longattn.patch(model, impl="reference") as m, pytest.raises(ValueError, match="decode: this model was"):
        longattn.hf.patch.Patched(m, longattn.hf.patch._states[id(m.config)]).cache()


def test_question_agnostic_compress_after_a_context_only_prefill():
    """Prefill the context, compress without the question, then feed question + decode on the compressed cache."""
    model = tiny_llama()
    context, question = prompt(40), prompt(6, seed=7)
    handle = longattn.patch(model, decode="snapkv", impl="reference", decode_config={"budget": 12, "window": 4})
    try:
        cache = handle.cache(auto_compress=False)
        with torch.no_grad():
            model(context, past_key_values=cache)
        assert int(cache.layers[0].lengths.max()) == 40 and cache.layers[0].queries.shape[2] == 4
        cache.compress()
        assert int(cache.layers[0].lengths.max()) == 12 and cache.layers[0].queries is None
        out = greedy(model, torch.cat([context, question], 1), new=4, past_key_values=cache)
        assert out.shape[1] == 50 and cache.get_seq_length() == 49
        assert int(cache.layers[1].lengths.max()) == 12 + 6 + 3
    finally:
        handle.restore()


def test_snapkv_long_context_holds_a_fortieth_of_dense_bytes():
    """Measured: a 4096-token prompt at budget 64 (the 128k / 2k case at CPU scale: 1/64 of the tokens) holds
    <= 1/40 of what the stock DynamicCache holds for the same generation."""
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = prompt(4096)
    dense = transformers.DynamicCache(config=model.config)
    greedy(model, ids, new=4, past_key_values=dense)
    dense_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dense.layers)
    with longattn.patch(model, decode="snapkv", decode_config={"budget": 64}) as m:
        handle_cache = longattn.hf.patch.Patched(m, longattn.hf.patch._states[id(m.config)]).cache()
        greedy(m, ids, new=4, past_key_values=handle_cache)
    ours = sum(handle_cache.bytes_by_device().values())
    assert ours * 40 <= dense_bytes, (ours, dense_bytes)


def test_left_padded_batch_generation_equals_dense():
    """Padding reaches the cached read through each slot's absolute position."""
    model = tiny_llama()
    a, b = prompt(30, seed=2), prompt(22, seed=3)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 30), torch.cat([torch.zeros(1, 8), torch.ones(1, 22)], 1)]).long()
    dense = greedy(model, batch, new=10, attention_mask=mask)
    config = {"budget": 64, "page_size": 8, "dense_layers": 0}
    with longattn.patch(model, decode="quest", impl="reference", decode_config=config) as m:
        assert torch.equal(greedy(m, batch, new=10, attention_mask=mask), dense)
