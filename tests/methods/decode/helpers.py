"""Shared pieces of the decode-policy tests: a tiny random Llama and the dense-equivalence check."""

from __future__ import annotations

import functools

import torch
import transformers

import longattn
from longattn.hf.compat import cache_kwargs


@functools.cache
def tiny_llama(layers: int = 2, heads: int = 4, kv_heads: int = 2):
    """A tiny randomly initialised fp32 Llama (GQA), built offline."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
                                   max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


def prompt(n: int = 40, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def greedy_with_logits(model, ids, new: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the logits of every generated step [new, B, vocab]."""
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def greedy(model, ids, new: int = 20, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)


def assert_dense_equivalent(policy: str, config: dict, *, n: int = 40, layers: int = 2, kv_heads: int = 2) -> None:
    """With a budget that keeps (or reads) everything, cached generation == the unpatched model's, token for token
    and in every step's logits (a tiny random model's near-uniform attention hides a dropped token from greedy
    tokens alone); and the cache really was a LongattnCache (the policy ran)."""
    model = tiny_llama(layers, 4, kv_heads)
    ids = prompt(n)
    dense, dense_logits = greedy_with_logits(model, ids)
    with longattn.patch(model, decode=policy, impl="reference", decode_config=config) as patched_model:
        ours, our_logits = greedy_with_logits(patched_model, ids)
    assert torch.equal(ours, dense), (ours, dense)
    torch.testing.assert_close(our_logits, dense_logits, rtol=1e-4, atol=1e-4)
    handle = longattn.patch(model, decode=policy, impl="reference", decode_config=config)
    try:
        cache = handle.cache()
        greedy(model, ids, new=3, **cache_kwargs(model, cache))
        assert cache.get_seq_length() == n + 2  # the last generated token is never fed back
    finally:
        handle.restore()


def assert_listed(name: str, paper_words: str, capsys) -> None:
    """`longattn methods` prints the policy with family 'decode' and its paper."""
    from longattn.cli import main

    assert main(["methods"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    row = next(r for r in rows if r and r[0] == name)
    assert row[1] == "decode" and paper_words in " ".join(row[2:]), row


def assert_padded_dense_equivalent(policy: str, config: dict, *, layers: int = 2) -> None:
    """A left-padded batch with a budget that reads everything == the unpatched model on the same batch."""
    model = tiny_llama(layers, 4, 2)
    a, b = prompt(30, seed=2), prompt(22, seed=3)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 30), torch.cat([torch.zeros(1, 8), torch.ones(1, 22)], 1)]).long()
    dense = greedy(model, batch, new=8, attention_mask=mask)
    with longattn.patch(model, decode=policy, impl="reference", decode_config=config) as patched_model:
        assert torch.equal(greedy(patched_model, batch, new=8, attention_mask=mask), dense)
