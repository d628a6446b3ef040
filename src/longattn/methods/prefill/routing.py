"""Routing Transformer (Roy et al. 2021): route queries and keys to k-means clusters and let each query attend
only to the keys of its own cluster."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longattn.masks.block_sparse import BlockSparse
from longattn.masks.core import MaskMod
from longattn.methods.prefill._blocks import geometry, label_blocks, square_block, to_block_sparse
from longattn.methods.prefill._select import check_budget, check_int
from longattn.methods.prefill.base import PrefillMethod
from longattn.methods.registry import register


@register("routing", "prefill", paper="Routing Transformer (Roy et al. 2021), k-means routed attention")
class RoutingAttention(PrefillMethod):
    """Spherical k-means per head over unit-normalised vectors: ``iters`` Lloyd steps from keys spread evenly over
    the sequence; every key joins its nearest centroid and every query the centroid it scores highest; a pair is
    kept when query and key share a cluster, or the key is among the query's ``local_window`` most recent
    positions (1 = itself, so no row is empty), always causally. Token-exact inside blocks; a block is computed
    when it holds a kept pair.

    ``cluster_on``: the paper trains with shared query/key projections, so queries and keys live in one space and
    are clustered together (``"both"``). Models trained without routing have separate projections whose queries
    and keys occupy different regions; clustered together they split into query-only and key-only clusters and
    almost nothing is kept (0.1% density on SmolLM2). ``"keys"`` (default) fits the centroids on the keys alone,
    which is the same rule when q and k share a space.

    Defaults: ``n_clusters`` = round(sqrt(Skv)) (the paper's sqrt(n) clusters), 3 Lloyd steps (the paper updates
    centroids by moving averages during training; a few steps stand in for them at inference), block 64.
    """

    def __init__(self, n_clusters: int | None = None, iters: int = 3, local_window: int = 1,
                 cluster_on: str = "keys", block: int = 64):
        if cluster_on not in ("keys", "both"):
            raise ValueError(f"cluster_on: expected 'keys' or 'both', got {cluster_on!r}")
        self.cluster_on = cluster_on
        self.n_clusters = None if n_clusters is None else check_int("n_clusters", n_clusters)
        self.iters = check_int("iters", iters, low=0)
        self.local_window = check_int("local_window", local_window)
        self.block = square_block(block)

    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        self.check(q, k)
        B, Hq, Sq, D = q.shape
        Skv = k.shape[2]
        n = max(1, round(math.sqrt(Skv))) if self.n_clusters is None else self.n_clusters
        check_budget("n_clusters", n, Skv, "keys")
        check_budget("local_window", self.local_window, Skv, "tokens")
        geo = geometry(Sq, Skv, self.block, q.device)
        kx = torch.nn.functional.normalize(k.float().repeat_interleave(Hq // k.shape[1], dim=1), dim=-1)
        qx = torch.nn.functional.normalize(q.float(), dim=-1)
        points = kx if self.cluster_on == "keys" else torch.cat([qx, kx], dim=2)  # [B, Hq, P, D]
        centroids = kx[:, :, torch.arange(n, device=q.device) * Skv // n]
        for _ in range(self.iters):
            assign = (points @ centroids.transpose(-1, -2)).argmax(-1)
            sums = torch.zeros_like(centroids).scatter_add_(2, assign.unsqueeze(-1).expand_as(points), points)
            empty = sums.norm(dim=-1, keepdim=True) == 0
            centroids = torch.where(empty, centroids, torch.nn.functional.normalize(sums, dim=-1))
        q_lab = (qx @ centroids.transpose(-1, -2)).argmax(-1)
        k_lab = (kx @ centroids.transpose(-1, -2)).argmax(-1)
        selected = label_blocks(q_lab, k_lab, n, geo) | geo.window(torch.tensor(self.local_window, device=q.device))
        off, local = geo.offset, self.local_window

        def routing_rule(b, h, q_idx, kv_idx):
            return (q_lab[b, h, q_idx] == k_lab[b, h, kv_idx]) | (q_idx + off - kv_idx < local)

        self.last_blocks = to_block_sparse(selected, geo, MaskMod(routing_rule, name="routing_clusters"))
        return self.last_blocks
