"""DELTA (Entezari Zarch et al., 2025): dynamic layer-aware token attention. The layers fall into three groups:
the first ``full_layers`` read the whole cache; a few Δ-layers also read the whole cache and, from their attention
summed over every head (one shared, "unified" selection), pick the top pages; every layer after a Δ-layer (until
the next one) is a sparse layer that reads only those pages, the attention sinks and a stable recency window. The
full KV cache is kept (nothing is evicted): a sparse layer's miss is recovered at the next Δ-layer or step.

Defaults: 2 full layers, Δ-layers at layer 2 and at 1/2 of the depth (resolved when the policy is bound to a
model), pages of 16 tokens, 16 sinks and 128 recent tokens inside a read budget of 2048 tokens. The paper's exact
per-model layer indices were not available offline; pass ``delta_layers`` to pin them."""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.hf.cache import LongattnLayer, cached_logits
from longattn.methods.decode.base import DecodePolicy, check_int, positions_mask, topk_mask
from longattn.methods.registry import register


@register("delta", "decode", paper="DELTA: Dynamic Layer-Aware Token Attention for Efficient Long-Context "
                                   "Reasoning (2025)")
class DELTA(DecodePolicy):
    """Sparse layers read ``budget`` tokens: ``sinks`` + the ``recent`` newest + the top pages of ``page_size``
    tokens chosen by the last Δ-layer. Layers ``< full_layers`` and the Δ-layers read everything."""

    budget_is_cap = True  # a read budget: at or above the context every page is read

    def __init__(self, budget: int = 2048, full_layers: int = 2, delta_layers: tuple[int, ...] | None = None,
                 page_size: int = 16, sinks: int = 16, recent: int = 128):
        super().__init__(budget)
        check_int("full_layers", full_layers, minimum=0)
        check_int("page_size", page_size)
        check_int("sinks", sinks, minimum=0)
        check_int("recent", recent, minimum=0)
        if budget is None:
            raise TypeError("budget: expected an int (tokens read by the sparse layers), got None")
        if sinks + recent + page_size > budget:
            raise ValueError(f"budget: {budget} leaves no page after sinks={sinks} + recent={recent}; expected a "
                             f"budget >= sinks + recent + page_size ({sinks + recent + page_size})")
        if (budget - sinks - recent) % page_size:
            raise ValueError(f"page_size: {page_size} does not divide budget - sinks - recent = "
                             f"{budget - sinks - recent}; the selected part of the budget is read in whole pages")
        if delta_layers is not None:
            layers = tuple(delta_layers)
            for i in layers:
                check_int("delta_layers", i, minimum=0)
            if not layers or list(layers) != sorted(set(layers)):
                raise ValueError(f"delta_layers: expected increasing layer indices, got {delta_layers!r}")
            if layers[0] < full_layers:
                raise ValueError(f"delta_layers: the first Δ-layer ({layers[0]}) must come at or after the "
                                 f"full-attention layers (full_layers={full_layers})")
            delta_layers = layers
        self.full_layers, self.delta_layers, self.page_size = full_layers, delta_layers, page_size
        self.sinks, self.recent = sinks, recent
        self._chosen: tuple[int, Tensor] | None = None  # (step position, bool [B, 1, cap]) shared by the layers

    def bind(self, config):
        super().bind(config)
        if self.delta_layers is None:
            self.delta_layers = tuple(sorted({self.full_layers, max(self.full_layers, self.num_layers // 2)}))
        if self.delta_layers[-1] >= self.num_layers:
            raise ValueError(f"delta_layers: {self.delta_layers} lie beyond the model's {self.num_layers} layers")

    def group(self, layer_idx: int) -> str:
        """'full', 'delta' or 'sparse': which of the three groups ``layer_idx`` belongs to."""
        if self.delta_layers is None:
            raise RuntimeError("delta: the policy is not bound to a model yet (delta_layers unresolved)")
        if layer_idx < self.full_layers or layer_idx < self.delta_layers[0]:
            return "full"
        return "delta" if layer_idx in self.delta_layers else "sparse"

    def choose(self, q: Tensor, layer: LongattnLayer) -> Tensor:
        """The Δ-layer's pick, bool [B, 1, cap]: sinks + recent + the pages with the most attention (summed over
        every query head, batch element by batch element), filling the rest of the budget."""
        probs = torch.softmax(cached_logits(q, layer), -1).nan_to_num_(0.0)  # [B, Hkv, g, 1, cap]
        votes = probs.sum((1, 2, 3))  # [B, cap]: one unified selection for all heads
        valid = layer.valid().any(1)  # [B, cap]
        ps, cap = self.page_size, layer.capacity
        n_pages = -(-cap // ps)
        pad = n_pages * ps - cap
        fixed = positions_mask(layer.pos.amax(1), valid, first=self.sinks, last=self.recent, seen=layer.seen)
        page_votes = torch.nn.functional.pad(votes.masked_fill(fixed, 0.0), (0, pad)).view(-1, n_pages, ps).sum(-1)
        page_ok = torch.nn.functional.pad(valid & ~fixed, (0, pad)).view(-1, n_pages, ps).any(-1)
        pages = topk_mask(page_votes, (self.budget - self.sinks - self.recent) // ps, page_ok)
        return (pages.repeat_interleave(ps, -1)[:, :cap] & valid | fixed)[:, None]

    def select(self, layer_idx, q, layer):
        if q.shape[2] != 1:
            return None
        kind = self.group(layer_idx)
        if kind == "full":
            return None
        if kind == "delta":
            self._chosen = (layer.seen, self.choose(q, layer))
            return None
        if self._chosen is None:
            raise RuntimeError("delta: a sparse layer ran before any Δ-layer in this step")
        seen, chosen = self._chosen
        if seen != layer.seen or chosen.shape[-1] != layer.capacity:
            raise RuntimeError("delta: the Δ-layer did not run before this sparse layer in this step")
        return chosen
