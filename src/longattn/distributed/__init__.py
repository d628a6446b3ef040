"""Context parallelism on torch.distributed (NCCL on GPUs, gloo on CPU; launch with torchrun): ring attention
with zigzag load balancing and Ulysses all-to-all attention over sequence shards, and the sharding helpers."""

from longattn.distributed.ring import ring_attention
from longattn.distributed.sharding import LAYOUTS, positions, shard, unshard
from longattn.distributed.ulysses import ulysses_attention

__all__ = ["LAYOUTS", "positions", "ring_attention", "shard", "ulysses_attention", "unshard"]
