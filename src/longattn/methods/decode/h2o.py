"""H2O (Zhang et al., 2023): keep the heavy hitters (largest accumulated attention) plus the recent tokens."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longattn.hf.cache import LongattnLayer, cached_logits
from longattn.methods.decode.base import DecodePolicy, check_fraction, topk_mask
from longattn.methods.registry import register


@register("h2o", "decode", paper="H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs (2023)")
class H2O(DecodePolicy):
    """``budget`` per head = heavy hitters (``heavy_ratio`` of it, the paper's even split) + recent tokens; the
    accumulated attention of every query so far (summed over the GQA group) ranks the heavy hitters."""

    query_window = None  # every prompt query votes
    budget_is_cap = True

    def __init__(self, budget: int = 1024, heavy_ratio: float = 0.5):
        super().__init__(budget)
        check_fraction("heavy_ratio", heavy_ratio)
        self.heavy = int(budget * heavy_ratio)
        self.recent = budget - self.heavy

    def _keep(self, scores: Tensor, positions: Tensor, valid: Tensor, seen: int) -> Tensor:
        recent = valid & (positions.long() >= seen - self.recent)
        return recent | topk_mask(scores, self.heavy, valid & ~recent)

    def compress(self, layer_idx, keys, values, queries, positions):
        self._pending = accumulated_attention(keys, queries)
        return self._keep(self._pending, positions, positions >= 0, positions.shape[-1])

    def apply_compress(self, layer_idx: int, layer: LongattnLayer) -> None:
        super().apply_compress(layer_idx, layer)
        # the scores were computed on the full prompt: re-derive them for the kept slots (evict moved them)
        full = self._pending
        scores = layer.add_slot_state("h2o")
        scores.copy_(full.gather(2, layer.pos.clamp(min=0).long()).masked_fill(~layer.valid(), 0.0))
        del self._pending

    def after_step(self, layer_idx, q, layer):
        p = torch.softmax(cached_logits(q, layer), -1).nan_to_num_(0.0)
        scores = layer.add_slot_state("h2o")
        scores += p.sum((2, 3))
        if layer.length_range[1] > self.budget:
            layer.evict(self._keep(layer.slot_state["h2o"], layer.pos, layer.valid(), layer.seen))


def accumulated_attention(keys: Tensor, queries: Tensor, chunk: int = 256) -> Tensor:
    """Column sums [B, Hkv, S] of the causal attention of all prompt queries [B, Hq, S, D] over keys [B, Hkv, S, D],
    summed over each GQA group; computed in query chunks (memory O(chunk × S))."""
    B, Hq, S, D = queries.shape
    Hkv = keys.shape[1]
    g = Hq // Hkv
    k = keys.float()[:, :, None]
    total = torch.zeros(B, Hkv, S, dtype=torch.float32, device=keys.device)
    for lo in range(0, S, chunk):
        hi = min(S, lo + chunk)
        s = queries[:, :, lo:hi].float().reshape(B, Hkv, g, hi - lo, D) @ k.transpose(-1, -2) / math.sqrt(D)
        s = s.masked_fill(torch.arange(S, device=keys.device) > torch.arange(lo, hi, device=keys.device)[:, None],
                          float("-inf"))
        total += torch.softmax(s, -1).sum((2, 3))
    return total
