"""Recycled Attention (Xu et al., 2024): full attention every ``stride`` steps; in between, read only the top
tokens of the last full step (recycled) plus the tokens generated since."""

from __future__ import annotations

import torch

from longattn.hf.cache import cached_logits
from longattn.methods.decode.base import DecodePolicy, check_int, topk_mask
from longattn.methods.registry import register


@register("recycled", "decode", paper="Recycled Attention: Efficient inference for long-context language models "
                                      "(2024)")
class RecycledAttention(DecodePolicy):
    """``budget`` tokens per kv head recycled from the last full-attention step; a full step every ``stride``."""

    budget_is_cap = True  # a read budget

    def __init__(self, budget: int = 2048, stride: int = 10):
        super().__init__(budget)
        check_int("stride", stride)
        self.stride = stride

    def select(self, layer_idx, q, layer):
        if q.shape[2] != 1:
            return None
        step, sel, first_fresh = getattr(layer, "recycled", (0, None, None))
        if sel is not None and step % self.stride:
            layer.recycled = (step + 1, sel, first_fresh)
            fresh = (torch.arange(layer.capacity, device=q.device) >= first_fresh[..., None]) & layer.valid()
            return torch.nn.functional.pad(sel, (0, layer.capacity - sel.shape[-1])) | fresh
        votes = torch.softmax(cached_logits(q, layer), -1).nan_to_num_(0.0).sum((2, 3))
        # this step's token is already stored (the cache is updated before attention): it and every later token
        # are read by the recycled steps. Slots, not capacity: storage grows with spare room while decoding.
        layer.recycled = (step + 1, topk_mask(votes, self.budget, layer.valid()), layer.lengths - 1)
        return None  # this step reads everything

    def tensors(self, layer):
        sel = getattr(layer, "recycled", (0, None, 0))[1]
        return [] if sel is None else [sel]
