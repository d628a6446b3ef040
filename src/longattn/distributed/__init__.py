"""Context parallelism on torch.distributed (NCCL on GPUs, gloo on CPU; launch with torchrun): ring attention
with zigzag load balancing, Ulysses all-to-all attention, their 2-D hybrid, state passing for linear attention, and
the sharding helpers."""

from longattn.distributed.hybrid import hybrid_attention, hybrid_groups, hybrid_shard, hybrid_unshard
from longattn.distributed.linear_state import linear_attention_cp
from longattn.distributed.ring import ring_attention
from longattn.distributed.sharding import LAYOUTS, positions, shard, unshard
from longattn.distributed.ulysses import ulysses_attention

__all__ = ["LAYOUTS", "hybrid_attention", "hybrid_groups", "hybrid_shard", "hybrid_unshard", "linear_attention_cp",
           "positions", "ring_attention", "shard", "ulysses_attention", "unshard"]
