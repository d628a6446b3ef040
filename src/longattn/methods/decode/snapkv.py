"""SnapKV (Li et al., 2024): the prompt's last ``window`` queries vote (pooled, per head) for the prefix tokens
to keep; the window itself is always kept."""

from __future__ import annotations

import torch

from longattn.methods.decode.base import DecodePolicy, check_int, pool1d, topk_mask, window_votes
from longattn.methods.registry import register

POOLING = ("max", "avg")


@register("snapkv", "decode", paper="SnapKV: LLM Knows What You are Looking for Before Generation (2024)")
class SnapKV(DecodePolicy):
    """``budget`` tokens per kv head after prefill = top prefix tokens by pooled window votes + the window."""

    def __init__(self, budget: int = 2048, window: int = 32, kernel: int = 7, pooling: str = "max"):
        super().__init__(budget)
        check_int("window", window)
        check_int("kernel", kernel)
        if kernel % 2 == 0:
            raise ValueError(f"kernel: the pooling kernel must be odd (keeps the length), got {kernel}")
        if pooling not in POOLING:
            raise ValueError(f"pooling: expected one of {POOLING}, got {pooling!r}")
        if budget < window:
            raise ValueError(f"budget: {budget} is smaller than the observation window ({window}); the window is "
                             f"always kept, so budget must be >= window")
        self.window, self.kernel, self.pooling = window, kernel, pooling
        self.query_window = window

    def layer_budget(self, layer_idx: int) -> int:
        """Tokens per kv head kept in this layer."""
        return self.budget

    def compress(self, layer_idx, keys, values, queries, positions):
        S = keys.shape[2]
        budget = self.layer_budget(layer_idx)
        if budget >= S:
            return None
        w = min(self.window, S, queries.shape[2])
        votes = pool1d(window_votes(keys, queries[:, :, -w:])[..., : S - w], self.kernel, self.pooling)
        keep = topk_mask(votes, budget - w)
        return torch.cat([keep, keep.new_ones(*keep.shape[:-1], w)], -1)  # the window is always kept
