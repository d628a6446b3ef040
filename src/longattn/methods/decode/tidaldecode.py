"""TidalDecode (Yang et al., 2024): a few token-selection layers run full attention and pick the top tokens;
the layers after each reuse those positions (position persistence) until the next selection layer."""

from __future__ import annotations

import torch

from longattn.hf.cache import cached_logits
from longattn.methods.decode.base import DecodePolicy, check_int, topk_mask
from longattn.methods.registry import register


@register("tidaldecode", "decode", paper="TidalDecode: Fast and Accurate LLM Decoding with Position Persistent "
                                         "Sparse Attention (2024)")
class TidalDecode(DecodePolicy):
    """Layers before ``selection_layers[0]`` read everything; each selection layer reads everything and picks the
    ``budget`` tokens with the most attention (summed over all heads); later layers read only those."""

    budget_is_cap = True  # a read budget

    def __init__(self, budget: int = 2048, selection_layers: tuple[int, ...] = (2, 13)):
        super().__init__(budget)
        layers = tuple(selection_layers)
        if not layers or list(layers) != sorted(set(layers)):
            raise ValueError(f"selection_layers: expected increasing layer indices, got {selection_layers!r}")
        for i in layers:
            check_int("selection_layers", i, minimum=0)
        self.selection_layers = layers
        self._chosen: tuple[int, torch.Tensor] | None = None  # (step position, bool [B, 1, cap]) shared by layers

    def bind(self, config):
        super().bind(config)
        if self.selection_layers[0] >= self.num_layers:
            raise ValueError(f"selection_layers: {self.selection_layers} lie beyond the model's {self.num_layers} "
                             f"layers")

    def select(self, layer_idx, q, layer):
        if q.shape[2] != 1 or layer_idx < self.selection_layers[0]:
            return None
        if layer_idx in self.selection_layers:
            votes = torch.softmax(cached_logits(q, layer), -1).nan_to_num_(0.0).sum((1, 2, 3))  # [B, cap]
            self._chosen = (layer.seen, topk_mask(votes, self.budget, layer.valid().any(1))[:, None])
            return None
        seen, chosen = self._chosen
        if seen != layer.seen or chosen.shape[-1] != layer.capacity:
            raise RuntimeError("tidaldecode: the selection layer did not run before this layer in this step")
        return chosen
