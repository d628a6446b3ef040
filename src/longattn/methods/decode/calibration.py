"""Calibration helpers shared by head-aware policies: synthetic passkey prompts and per-layer q/k/v capture from
one forward of a stock transformers model (through a temporary attention function, no forked model code)."""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.api import attention

CAPTURE_NAME = "longattn_capture"


def passkey_ids(batch: int, length: int, vocab: int, *, key_len: int = 8, seed: int = 0) -> Tensor:
    """Random filler with a random key span hidden in the first half and its first half repeated at the end, so
    predicting the end requires looking far back (synthetic passkey retrieval, token ids only)."""
    if length < 4 * key_len:
        raise ValueError(f"length: expected >= {4 * key_len} tokens for a key of {key_len}, got {length}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    for b in range(batch):
        at = int(torch.randint(length // 8, length // 2, (1,), generator=g))
        key = ids[b, at:at + key_len].clone()
        ids[b, -key_len // 2:] = key[: key_len // 2]
    return ids


def capture_qkv(model, ids: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Post-RoPE (q, k, v) [B, H, S, D] of every attention layer for one forward over ``ids``."""
    from transformers import AttentionInterface

    from longattn.hf.patch import _set_attn_implementation

    captured: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def capture(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        captured[module.layer_idx] = (query.detach(), key.detach(), value.detach())
        out = attention(query, key, value, causal=True, scale=scaling, impl="reference")
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(CAPTURE_NAME, capture)
    previous = model.config._attn_implementation
    _set_attn_implementation(model, CAPTURE_NAME)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        _set_attn_implementation(model, previous)
    return [captured[i] for i in sorted(captured)]
