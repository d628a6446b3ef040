"""LongattnCache: per-head kept tokens read exactly, bytes measured, offload failing loudly, memory at a budget."""

from __future__ import annotations

import pytest
import torch
import transformers

import longattn
from longattn.hf import cache as cache_mod
from longattn.hf.cache import LongattnLayer, attend_cached
from longattn.hf.compat import cache_kwargs
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
        greedy(model, prompt(40), new=4, **cache_kwargs(model, cache))
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
            model(context, **cache_kwargs(model, cache))
        assert int(cache.layers[0].lengths.max()) == 40 and cache.layers[0].queries.shape[2] == 4
        cache.compress()
        assert int(cache.layers[0].lengths.max()) == 12 and cache.layers[0].queries is None
        out = greedy(model, torch.cat([context, question], 1), new=4, **cache_kwargs(model, cache))
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
    greedy(model, ids, new=4, **cache_kwargs(model, dense))
    dense_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dense.layers)
    with longattn.patch(model, decode="snapkv", decode_config={"budget": 64}) as m:
        handle_cache = longattn.hf.patch.Patched(m, longattn.hf.patch._states[id(m.config)]).cache()
        greedy(m, ids, new=4, **cache_kwargs(m, handle_cache))
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


# ---------------------------------------------------------------------------------------- window and head-split layers
WINDOWS = [(0, 1), (2, 3), (4, 16)]  # (sinks, recent)
STEPS = [(1, 1, 1, 1, 1, 1), (5, 1, 3, 1, 7, 2)]  # token counts of the updates after the prompt (decode / chunks)


def _window_mask(heads_stream, group: int, sinks: int, recent: int, offset: int):
    """Causal is added by the reference; streaming kv heads (bool per kv head) also need kv < sinks or kv > q - recent
    (q absolute: the reference's q_idx counts from the first query, which sits at ``offset``)."""

    def mod(b, h, qi, kv):
        return ~heads_stream[h // group] | (kv < sinks) | (kv > qi + offset - recent)

    return MaskMod(mod)


def _check_split_reads(layer, stream, group, sinks, recent, prompt_len, steps, dtype, seed):
    """Feed a prompt then ``steps`` updates; after each, the cached read of the new queries equals explicit masked
    attention over every token so far (fp64 oracle, with plain PyTorch in ``dtype`` as the error baseline)."""
    B, Hkv, D = 2, len(stream), 16
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    k, v = rand(B, Hkv, prompt_len, D), rand(B, Hkv, prompt_len, D)
    layer.update(k, v)
    for n in steps:
        kn, vn = rand(B, Hkv, n, D), rand(B, Hkv, n, D)
        layer.update(kn, vn)
        k, v = torch.cat([k, kn], 2), torch.cat([v, vn], 2)
        q = rand(B, Hkv * group, n, D)
        out = attend_cached(q, layer)
        layer.after_read()
        mask = _window_mask(torch.tensor(stream), group, sinks, recent, k.shape[2] - n)
        ref = reference_attention(q.double(), k.double(), v.double(), mask=mask, causal=True)[0]
        low = reference_attention(q, k, v, mask=mask, causal=True, compute_dtype=dtype)[0]
        assert_close_to_reference(out, ref, low)
    return k.shape[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("steps", STEPS, ids=["decode", "chunks"])
@pytest.mark.parametrize("sinks,recent", WINDOWS, ids=[f"s{s}-r{r}" for s, r in WINDOWS])
@pytest.mark.parametrize("prompt_len", [1, 9, 40], ids=["p1", "p9", "p40"])
def test_window_layer_read_equals_masked_reference(prompt_len, sinks, recent, steps, dtype):
    """A WindowLayer reads sinks + the last ``recent`` positions of each query (a chunk's early queries included),
    and between calls holds at most sinks + recent slots: exactly the tokens still in the window."""
    layer = cache_mod.WindowLayer(sinks, recent)
    seen = _check_split_reads(layer, [True, True], 2, sinks, recent, prompt_len, steps, dtype, seed=prompt_len)
    assert layer.capacity <= sinks + recent
    want = sorted(p for p in range(seen) if p < sinks or p >= seen - recent)
    assert sorted(layer.kept_positions(1, 1)) == want and layer.lengths.tolist() == [[len(want)] * 2] * 2


SPLITS = {"all-retrieval": [False, False, False], "all-streaming": [True, True, True], "mixed": [False, True, False],
          "mixed-2": [True, False, True]}


@pytest.mark.parametrize("group", [1, 4], ids=["mha", "gqa4"])
@pytest.mark.parametrize("split", list(SPLITS), ids=list(SPLITS))
@pytest.mark.parametrize("steps", STEPS, ids=["decode", "chunks"])
def test_head_split_layer_read_equals_masked_reference(split, group, steps):
    """Retrieval heads (full store) and streaming heads (window store) of one layer, read part by part with their
    GQA query heads and written back in place, equal one masked attention over the full KV."""
    stream = SPLITS[split]
    sinks, recent = 2, 5
    full_heads = [h for h, s in enumerate(stream) if not s]
    stream_heads = [h for h, s in enumerate(stream) if s]
    parts = ([(full_heads, LongattnLayer())] if full_heads else []) + (
        [(stream_heads, cache_mod.WindowLayer(sinks, recent))] if stream_heads else [])
    layer = cache_mod.HeadSplitLayer(parts)
    seen = _check_split_reads(layer, stream, group, sinks, recent, 30, steps, torch.float32, seed=group)
    window = sinks + recent
    assert layer.lengths.tolist() == [[window if s else seen for s in stream]] * 2
    assert layer.kv_shape() == (2, 3, 16, 16) and layer.get_seq_length() == seen
    for h, s in enumerate(stream):
        want = [p for p in range(seen) if not s or p < sinks or p >= seen - recent]
        assert sorted(layer.kept_positions(0, h)) == want


def test_head_split_layer_rejects_bad_groups():
    with pytest.raises(ValueError, match="parts: expected non-empty, disjoint"):
        cache_mod.HeadSplitLayer([([0, 1], LongattnLayer()), ([1], LongattnLayer())])
    layer = cache_mod.HeadSplitLayer([([0], LongattnLayer()), ([2], LongattnLayer())])
    with pytest.raises(ValueError, match="do not cover the layer's 2 kv heads"):
        layer.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    layer = cache_mod.HeadSplitLayer([([0], LongattnLayer()), ([1], LongattnLayer())])
    layer.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="selection: a HeadSplitLayer"):
        attend_cached(torch.randn(1, 2, 1, 4), layer, torch.ones(1, 2, 3, dtype=torch.bool))
