"""StreamingLLM (Xiao et al., 2023): keep a few attention-sink tokens plus a window of the most recent ones."""

from __future__ import annotations

from torch import Tensor

from longattn.hf.cache import LongattnLayer
from longattn.methods.decode.base import DecodePolicy, check_int, positions_mask
from longattn.methods.registry import register


@register("streaming_llm", "decode", paper="Efficient Streaming Language Models with Attention Sinks (2023)")
class StreamingLLM(DecodePolicy):
    """Keep ``sinks`` first tokens + the most recent ``budget - sinks``; evicts at prefill and every step."""

    budget_is_cap = True

    def __init__(self, budget: int = 1024, sinks: int = 4):
        super().__init__(budget)
        check_int("sinks", sinks, minimum=0)
        if sinks >= budget:
            raise ValueError(f"sinks: {sinks} sink tokens leave no room for recent ones in budget={budget}")
        self.sinks = sinks

    def _keep(self, layer: LongattnLayer) -> Tensor:
        return positions_mask(layer.pos, layer.valid(), first=self.sinks, last=self.budget - self.sinks,
                              seen=layer.seen)

    def compress(self, layer_idx, keys, values, queries, positions):
        seen = positions.shape[-1]
        return positions_mask(positions, positions >= 0, first=self.sinks, last=self.budget - self.sinks, seen=seen)

    def after_step(self, layer_idx, q, layer):
        if layer.length_range[1] > self.budget:
            layer.evict(self._keep(layer))
