"""``longattn.patch`` on tiny randomly initialised Llama / Mistral / Qwen2 / Gemma models built offline."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import longattn  # noqa: E402
from longattn.hf.compat import cache_kwargs, output_cache  # noqa: E402

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
}


def tiny(family: str, attn: str = "sdpa", **extra):
    cfg_cls, model_cls = FAMILIES[family]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, **extra)
    cfg._attn_implementation = attn
    return model_cls(cfg).eval()


def _ids(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("impl", ["reference", "sdpa", "auto"])
def test_dense_matches_stock_sdpa_logits(family, impl):
    model = tiny(family)
    ids = _ids(45)
    with torch.no_grad():
        stock = model(ids).logits
        with longattn.patch(model, impl=impl):
            ours = model(ids).logits
        again = model(ids).logits
    assert (ours - stock).abs().max() <= 1e-4
    assert torch.equal(again, stock)  # restored
    assert model.config._attn_implementation == "sdpa"


def test_sliding_window_pattern_equals_the_models_own_sliding_window():
    """Our sliding_window pattern on a plain Mistral == Mistral configured with the same sliding window (stock)."""
    w = 7
    stock_model = tiny("mistral", sliding_window=w)
    plain = tiny("mistral", sliding_window=None)
    ids = _ids(40)
    with torch.no_grad():
        stock = stock_model(ids).logits
        with longattn.patch(plain, prefill="sliding_window", impl="reference", window=w):
            ours = plain(ids).logits
        dense = plain(ids).logits
    assert (ours - stock).abs().max() <= 1e-4
    assert (dense - stock).abs().max() > 1e-2  # the pattern really changed the computation


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_cached_generate_matches_uncached_forward(family):
    model = tiny(family)
    ids = _ids(20, batch=1)
    with longattn.patch(model, impl="reference"), torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        full = model(out).logits
    new = out[0, ids.shape[1]:]
    assert torch.equal(full[0, ids.shape[1] - 1:-1].argmax(-1), new)


def test_prefill_pattern_shapes_the_prompt_and_decoding_reads_the_whole_cache():
    """A prefill pattern applies to prompt (multi-token) forwards only; each decoding step attends to the whole
    cache, as for the dynamic methods (decode-time policies are a separate knob)."""
    model = tiny("llama")
    ids = _ids(20, batch=1)
    knobs = {"num_sinks": 2, "window": 8}
    with torch.no_grad():
        with longattn.patch(model, prefill="streaming", impl="reference", **knobs):
            out = model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
            patterned = model(ids).logits[0, -1]
            ours = model(ids[:, -1:], **cache_kwargs(model, output_cache(model(ids[:, :-1], use_cache=True)))).logits
            cache = output_cache(model(ids[:, :-1], use_cache=True))
        stock_step = model(ids[:, -1:], **cache_kwargs(model, cache)).logits  # stock SDPA: dense over the same cache
    assert out[0, ids.shape[1]] == patterned.argmax()
    assert (ours - stock_step).abs().max() <= 1e-4
    assert (ours[0, -1] - patterned).abs().max() > 1e-3  # the step really was not restricted to the pattern


def test_padded_batch_equals_per_sequence_runs():
    model = tiny("llama")
    a, b = _ids(12, 1, seed=2), _ids(7, 1, seed=3)
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)])
    attn = torch.cat([torch.ones(1, 12), torch.cat([torch.zeros(1, 5), torch.ones(1, 7)], 1)]).long()
    with longattn.patch(model, impl="reference"), torch.no_grad():
        both = model(batch, attention_mask=attn).logits
        la = model(a).logits
        lb = model(b, position_ids=torch.arange(7)[None]).logits
    assert (both[0] - la[0]).abs().max() <= 1e-4
    pos = torch.arange(7)[None]
    with longattn.patch(model, impl="reference"), torch.no_grad():
        both_pos = model(batch, attention_mask=attn, position_ids=torch.cat([torch.arange(12)[None],
                                                                             torch.cat([pos[:, :1].expand(1, 5),
                                                                                        pos], 1)])).logits
    assert (both_pos[1, 5:] - lb[0]).abs().max() <= 1e-4


def test_bad_input():
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"method: unknown name 'nope'; valid names: .*sliding_window"):
        longattn.patch(model, prefill="nope")
    with pytest.raises(ValueError, match="decode: unknown policy 'nope'; valid: .*snapkv"):
        longattn.patch(model, decode="nope")
    with pytest.raises(ValueError, match="decode_config: knobs"):
        longattn.patch(model, decode_config={"budget": 3})
    with pytest.raises(ValueError, match="impl: expected one of"):
        longattn.patch(model, impl="fast")
    with pytest.raises(ValueError, match="config: knobs"):
        longattn.patch(model, window=3)
    with pytest.raises(ValueError, match="window"):
        longattn.patch(model, prefill="sliding_window", window=0)

    class NotAModel(torch.nn.Module):
        config = type("C", (), {"model_type": "gpt2"})()

    with pytest.raises(ValueError, match="model: unsupported model type 'gpt2'"):
        longattn.patch(NotAModel())
