"""DuoAttention: retrieval heads keep all, streaming heads sinks + recent; gates optimised and saved once."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import longattn
from longattn.eval.kvstats import dense_bytes, held_bytes
from longattn.hf.cache import HeadSplitLayer, LongattnCache, LongattnLayer
from longattn.hf.compat import cache_kwargs
from longattn.methods.decode.base import DecodePolicy, positions_mask
from longattn.methods.decode.duo import DuoAttention
from tests.methods.decode.helpers import assert_dense_equivalent, greedy, prompt, tiny_llama
from tests.oracle import assert_close_to_reference


def _gates(tmp_path, gates):
    path = tmp_path / "gates.json"
    path.write_text(json.dumps({"gates": gates}))
    return str(path)


def test_window_covering_everything_equals_dense(tmp_path):
    path = _gates(tmp_path, [[0.9, 0.1], [0.2, 0.8]])
    assert_dense_equivalent("duo", {"gates_path": path, "sinks": 4, "recent": 60})


def test_kept_set_hand_worked_with_different_head_lengths(tmp_path):
    """Retrieval head: a full store; streaming head: a ring of sinks + recent, a decoding step overwriting the token
    that left the window in place."""
    policy = DuoAttention(_gates(tmp_path, [[0.9, 0.1]]), sparsity=0.5, sinks=2, recent=3)
    layer = policy.make_layer(0)
    assert isinstance(layer, HeadSplitLayer)
    k = torch.randn(1, 2, 10, 4)
    layer.update(k, k)
    policy.apply_compress(0, layer)
    assert layer.kept_positions(0, 0) == list(range(10))  # retrieval head
    assert layer.kept_positions(0, 1) == [0, 1, 8, 9, 7]  # streaming head: slot 2 + (p - 2) % 3
    layer.update(k[:, :, :1], k[:, :, :1])
    layer.after_read()
    assert layer.lengths.tolist() == [[11, 5]] and layer.kept_positions(0, 1) == [0, 1, 8, 9, 10]


GATES = [[0.9, 0.8], [0.1, 0.2], [0.7, 0.3]]  # sparsity 0.5: layer 0 all retrieval, 1 all streaming, 2 mixed
ORACLE = "duo_oracle"


def _oracle_generate(model, ids, retrieval, sinks, recent, new, chunks=(), compute=torch.float64):
    """Plain transformers on its DynamicCache with an explicit masked attention over the full KV: every head
    attends the first prompt densely; afterwards a streaming kv head's query at t reads kv < sinks or kv > t - recent.
    ``chunks``: token blocks fed after ``ids`` before greedy decoding; attention computed in ``compute``. Returns
    (tokens, per-step logits)."""
    from transformers import AttentionInterface

    from longattn.hf.patch import _set_attn_implementation

    def masked(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        B, Hq, Sq, D = query.shape
        Hkv, Skv = key.shape[1], key.shape[2]
        qi = torch.arange(Skv - Sq, Skv)[:, None]
        kv = torch.arange(Skv)
        allowed = (kv <= qi).expand(Hkv, Sq, Skv).clone()
        if Sq < Skv:  # not the first prompt
            stream = ~retrieval[module.layer_idx]
            allowed[stream] &= (kv < sinks) | (kv > qi - recent)
        g = Hq // Hkv
        k, v = key.to(compute).repeat_interleave(g, 1), value.to(compute).repeat_interleave(g, 1)
        s = (query.to(compute) @ k.transpose(-1, -2)) * scaling
        s = s.masked_fill(~allowed.repeat_interleave(g, 0), float("-inf"))
        out = torch.softmax(s, -1) @ v
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register(ORACLE, masked)
    previous = model.config._attn_implementation
    _set_attn_implementation(model, ORACLE)
    try:
        return _feed_and_decode(model, ids, chunks, new, transformers.DynamicCache(config=model.config))
    finally:
        _set_attn_implementation(model, previous)


@torch.no_grad()
def _feed_and_decode(model, ids, chunks, new, cache):
    out = model(ids, **cache_kwargs(model, cache))
    for c in chunks:
        out = model(c, **cache_kwargs(model, cache))
    tokens, logits = [], []
    for _ in range(new):
        logits.append(out.logits[:, -1])
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
        out = model(tokens[-1], **cache_kwargs(model, cache))
    return torch.cat(tokens, 1), torch.stack(logits, 1)


HEADS = [(4, 2), (8, 2), (2, 2)]  # (query heads, kv heads): GQA 2, 4, 1


@pytest.mark.parametrize("heads,kv_heads", HEADS, ids=[f"gqa{h // k}" for h, k in HEADS])
@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "question-chunk"])
def test_split_cache_equals_masked_attention_oracle(tmp_path, heads, kv_heads, chunked):
    """A 3-layer model with an all-retrieval, an all-streaming and a mixed layer: greedy tokens equal the explicit
    masked-attention oracle over the full KV, logits within 2x fp32's own error against it; the streaming heads
    really dropped tokens (the prompt is longer than sinks + recent)."""
    model = tiny_llama(3, heads, kv_heads)
    sinks, recent = 4, 8
    path = _gates(tmp_path, GATES)
    policy = DuoAttention(path, sparsity=0.5, sinks=sinks, recent=recent)
    ids = prompt(50)
    chunks = (prompt(7, seed=5),) if chunked else ()
    ref_tokens, ref_logits = _oracle_generate(model, ids, policy.retrieval, sinks, recent, 10, chunks)
    handle = longattn.patch(model, decode="duo", impl="reference",
                            decode_config={"gates_path": path, "sparsity": 0.5, "sinks": sinks, "recent": recent})
    try:
        cache = handle.cache(auto_compress=not chunked)
        tokens, logits = _feed_and_decode(model, ids, chunks, 10, cache)
    finally:
        handle.restore()
    assert torch.equal(tokens, ref_tokens), (tokens, ref_tokens)
    assert [type(layer).__name__ for layer in cache.layers] == ["LongattnLayer", "WindowLayer", "HeadSplitLayer"]
    assert cache.layers[1].capacity == sinks + recent and cache.layers[0].lengths.min() == cache.get_seq_length()
    low = _oracle_generate(model, ids, policy.retrieval, sinks, recent, 10, chunks, compute=torch.float32)[1]
    assert_close_to_reference(logits, ref_logits, low)


def test_generate_equals_the_old_padded_implementation(tmp_path):
    """The padded single-store layout this replaces kept the last ``recent`` tokens after each step and read them plus
    the new token: the same reads as the split stores with ``recent + 1``, token for token through generate."""
    path = _gates(tmp_path, GATES)

    class OldDuo(DuoAttention):  # the replaced implementation: one padded store, eviction by position mask
        def make_layer(self, layer_idx, offload=None):
            return LongattnLayer(offload=offload)

        def _keep(self, layer_idx, positions, valid, seen):
            stream = positions_mask(positions, valid, first=self.sinks, last=self.recent, seen=seen)
            return stream | (valid & self.retrieval[layer_idx][None, :, None])

        def apply_compress(self, layer_idx, layer):
            DecodePolicy.apply_compress(self, layer_idx, layer)

        def compress(self, layer_idx, keys, values, queries, positions):
            return self._keep(layer_idx, positions, positions >= 0, positions.shape[-1])

        def after_step(self, layer_idx, q, layer):
            if bool((layer.lengths[:, ~self.retrieval[layer_idx]] > self.sinks + self.recent).any()):
                layer.evict(self._keep(layer_idx, layer.pos, layer.valid(), layer.seen))

    model = tiny_llama(3, 4, 2)
    ids = prompt(60)
    config = {"gates_path": path, "sparsity": 0.5, "sinks": 4, "recent": 9}
    with longattn.patch(model, decode="duo", impl="reference", decode_config=config) as m:
        ours = greedy(m, ids, new=15)
    old_policy = OldDuo(path, sparsity=0.5, sinks=4, recent=8)
    handle = longattn.patch(model, decode="duo", impl="reference", decode_config=config)
    try:
        old_cache = LongattnCache(old_policy, 3, config_key=id(model.config))
        old = greedy(model, ids, new=15, **cache_kwargs(model, old_cache))
    finally:
        handle.restore()
    assert torch.equal(ours, old), (ours, old)
    assert int(old_cache.layers[1].lengths.max()) == 12  # the old layout really evicted


def test_held_bytes_are_retrieval_full_plus_streaming_window(tmp_path):
    """kv bytes held = (retrieval heads x tokens + streaming heads x (sinks + recent)) x (K + V) x head_dim x 4 after
    the prompt; decoding grows only the retrieval stores (by at most their 1/8 growth slack), never the windows."""
    model = tiny_llama(3, 4, 2)
    sinks, recent, n = 4, 12, 300
    path = _gates(tmp_path, GATES)
    per_token = 2 * 16 * 4  # K + V, head_dim 16, fp32
    n_ret, n_stream = 3, 3  # over the three layers
    handle = longattn.patch(model, decode="duo", impl="reference",
                            decode_config={"gates_path": path, "sparsity": 0.5, "sinks": sinks, "recent": recent})
    try:
        cache = handle.cache()
        with torch.no_grad():
            out = model(prompt(n), **cache_kwargs(model, cache))
        held = sum(cache.bytes_by_device(kv_only=True).values())
        assert held == (n_ret * n + n_stream * (sinks + recent)) * per_token
        padded = (2 * n + 2 * (sinks + recent) + 2 * n) * per_token  # one store per layer, the mixed one padded
        assert held == padded - (n - sinks - recent) * per_token
        assert dense_bytes(cache, n) == 6 * n * per_token and held_bytes(cache)["kv"] == held  # what eval reports
        with torch.no_grad():
            for _ in range(20):
                out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(model, cache))
        seen = cache.get_seq_length()
        held = sum(cache.bytes_by_device(kv_only=True).values())
        assert (n_ret * seen + n_stream * (sinks + recent)) * per_token <= held
        assert held <= (n_ret * seen * 9 / 8 + n_ret * 16 + n_stream * (sinks + recent)) * per_token
        assert cache.layers[1].capacity == sinks + recent and cache.layers[2].parts[1][1].capacity == sinks + recent
    finally:
        handle.restore()


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="gates_path: no DuoAttention gate file at .*optimize_gates"):
        DuoAttention(str(tmp_path / "missing.json"))
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"gates_path: gates of shape \(1, 2\) do not fit this model"):
        longattn.patch(model, decode="duo", decode_config={"gates_path": _gates(tmp_path, [[0.5, 0.5]])})
