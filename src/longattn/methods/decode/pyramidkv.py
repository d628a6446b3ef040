"""PyramidKV (Cai et al., 2024): SnapKV's selection with budgets shrinking linearly from the first layer to the
last (same total), since attention gets more focused in deeper layers."""

from __future__ import annotations

from longattn.methods.decode.base import check_int
from longattn.methods.decode.snapkv import SnapKV
from longattn.methods.registry import register


@register("pyramidkv", "decode", paper="PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information "
                                       "Funneling (2024)")
class PyramidKV(SnapKV):
    """``budget`` is the mean per layer; the last layer keeps ``budget / beta``, the first ``2 budget - that``."""

    def __init__(self, budget: int = 2048, window: int = 32, kernel: int = 7, pooling: str = "avg", beta: int = 20):
        super().__init__(budget, window, kernel, pooling)
        check_int("beta", beta)
        self.beta = beta

    def compress(self, layer_idx, keys, values, queries, positions):
        if self.budget >= keys.shape[2]:  # the total (budget × layers) already holds every layer's whole prompt
            return None
        return super().compress(layer_idx, keys, values, queries, positions)

    def layer_budget(self, layer_idx: int) -> int:
        L = max(self.num_layers, 1)
        low = self.budget / self.beta
        high = 2 * self.budget - low
        b = high if L == 1 else high - (high - low) * layer_idx / (L - 1)
        return max(self.window, int(round(b)))
