"""StreamingLLM (Xiao et al., 2023): keep a few attention-sink tokens plus a window of the most recent ones.

The cache is a ``WindowLayer`` ring of ``sinks + (budget - sinks)`` slots: the prompt keeps its sinks and last
tokens, and each new token overwrites, in place, the one that just left the window. As in the authors' cache (room
is made before the new token's step), a step reads exactly ``budget`` tokens: the sinks and the ``budget - sinks``
most recent, the new one included."""

from __future__ import annotations

from longattn.hf.cache import WindowLayer
from longattn.methods.decode.base import DecodePolicy, check_int, positions_mask
from longattn.methods.registry import register


@register("streaming_llm", "decode", paper="Efficient Streaming Language Models with Attention Sinks (2023)")
class StreamingLLM(DecodePolicy):
    """Keep ``sinks`` first tokens + the most recent ``budget - sinks`` (a ring: nothing is evicted per step)."""

    budget_is_cap = True

    def __init__(self, budget: int = 1024, sinks: int = 4):
        super().__init__(budget)
        check_int("sinks", sinks, minimum=0)
        if sinks >= budget:
            raise ValueError(f"sinks: {sinks} sink tokens leave no room for recent ones in budget={budget}")
        self.sinks = sinks

    def make_layer(self, layer_idx: int, offload: str | None = None) -> WindowLayer:
        return WindowLayer(self.sinks, self.budget - self.sinks, offload=offload)

    def compress(self, layer_idx, keys, values, queries, positions):
        """The kept set for a stored prompt (what the ring holds after it): sinks and the last tokens."""
        seen = positions.shape[-1]
        return positions_mask(positions, positions >= 0, first=self.sinks, last=self.budget - self.sinks, seen=seen)

    def apply_compress(self, layer_idx, layer):
        """Nothing to evict: the ring already holds exactly the sinks and the most recent tokens."""
        layer.queries = None
        layer.compressed = True
