"""Attention patterns as FlexAttention-style mask_mod functions, composable with & | ~."""

from longattn.masks.core import MaskMod, as_mask_mod, evaluate
from longattn.masks.neighborhood import neighborhood
from longattn.masks.patterns import (
    bigbird,
    block_local,
    causal,
    dilated,
    document,
    document_ids,
    full,
    global_tokens,
    longlora_shifted,
    per_head_window,
    power,
    random_blocks,
    sinks,
    sliding_window,
    strided,
)
from longattn.masks.radial import radial

__all__ = [
    "MaskMod", "as_mask_mod", "evaluate",
    "bigbird", "block_local", "causal", "dilated", "document", "document_ids", "full", "global_tokens",
    "longlora_shifted", "neighborhood", "per_head_window", "power", "radial", "random_blocks", "sinks",
    "sliding_window", "strided",
]
