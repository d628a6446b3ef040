"""TokenSelect (Wu et al., 2024): token-level selection by per-head soft voting (each query head's softmax over
the keys, summed over its GQA group), with a selection cache reused while consecutive queries stay similar."""

from __future__ import annotations

import torch

from longattn.hf.cache import cached_logits
from longattn.methods.decode.base import DecodePolicy, check_fraction, topk_mask
from longattn.methods.registry import register


@register("tokenselect", "decode", paper="TokenSelect: Efficient Long-Context Inference and Length Extrapolation "
                                         "for LLMs via Dynamic Token-Level KV Cache Selection (2024)")
class TokenSelect(DecodePolicy):
    """Read the ``budget`` top-voted tokens per kv head; reselect only when the query's cosine similarity to the
    query of the last selection drops below ``threshold`` (tokens appended since are always read)."""

    budget_is_cap = True  # a read budget

    def __init__(self, budget: int = 2048, threshold: float = 0.9):
        super().__init__(budget)
        check_fraction("threshold", threshold, low=-1.0)
        self.threshold = threshold

    def select(self, layer_idx, q, layer):
        if q.shape[2] != 1:
            return None
        cached = getattr(layer, "tokenselect", None)
        if cached is not None:
            q0, sel, n0 = cached
            similarity = torch.nn.functional.cosine_similarity(q.float().flatten(1), q0.flatten(1))
            if float(similarity.min()) >= self.threshold:
                fresh = (torch.arange(layer.capacity, device=q.device) >= n0) & layer.valid()
                return torch.nn.functional.pad(sel, (0, layer.capacity - sel.shape[-1])) | fresh
        votes = torch.softmax(cached_logits(q, layer), -1).nan_to_num_(0.0).sum((2, 3))  # [B, Hkv, cap]
        B, Hkv = layer.lengths.shape
        layer.note_scoring(B * Hkv * layer.capacity / 2)  # the vote reads every key: half a slot each
        sel = topk_mask(votes, self.budget, layer.valid())
        layer.tokenselect = (q.float().clone(), sel, layer.capacity)
        return sel

    def tensors(self, layer):
        cached = getattr(layer, "tokenselect", None)
        return [] if cached is None else list(cached[:2])
