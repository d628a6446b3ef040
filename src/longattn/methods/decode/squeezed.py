"""Squeezed Attention (Hooper et al., 2024): the fixed context (the prompt present at ``compress``: documents, a
system prompt) is clustered offline, per kv head, by k-means over its keys into fine clusters, and the fine
centroids again into coarse clusters. At each decoding step a query estimates each cluster's attention mass as
softmax(q · centroid / sqrt(d) + log |cluster|) (summed over the GQA group): first over the coarse centroids,
keeping the best ones until they hold ``coarse_factor`` x ``budget`` tokens, then over the fine centroids inside
those, keeping the best until they hold ``budget`` tokens; it reads those clusters' keys plus everything after the
fixed context (question, generated tokens). Nothing is evicted. (The fine masses are computed for every fine
centroid and masked to the explored coarse clusters: the same selection as the paper's, without its saving of
scoring only the explored clusters' children.)

The paper keeps clusters whose estimated mass passes a threshold calibrated offline for a target sparsity; here a
token budget plays that role (no calibration pass needed). Defaults: fine centroids for 5% of the context's
tokens, coarse for 1% (our reading of the paper's setting), 10 Lloyd iterations, a budget of 2048 tokens."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from longattn.hf.cache import LongattnLayer
from longattn.methods.decode.base import DecodePolicy, check_fraction, check_int
from longattn.methods.registry import register


def nearest(x: Tensor, c: Tensor, *, chunk: int = 1024) -> Tensor:
    """Index [N, n] of the nearest centroid c [N, k, D] to each point x [N, n, D], ``chunk`` points at a time so the
    distance matrix stays O(chunk x k) per head."""
    return torch.cat([torch.cdist(x[:, i:i + chunk], c).argmin(-1) for i in range(0, x.shape[1], chunk)], 1)


def kmeans(x: Tensor, k: int, iters: int) -> tuple[Tensor, Tensor]:
    """Batched Lloyd k-means of x [N, n, D] into k clusters (k <= n), initialised on k evenly spaced points
    (deterministic); an emptied cluster keeps its last centroid. Returns (centroids [N, k, D], assign [N, n])."""
    N, n, D = x.shape
    x = x.float()
    init = torch.linspace(0, n - 1, k, device=x.device).round().long()
    c = x[:, init].clone()
    ones = torch.ones(N, n, device=x.device)
    for _ in range(iters):
        assign = nearest(x, c)
        sums = torch.zeros_like(c).scatter_add_(1, assign[..., None].expand(N, n, D), x)
        counts = torch.zeros(N, k, device=x.device).scatter_add_(1, assign, ones)
        c = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], c)
    return c, nearest(x, c)


def take_until(mass: Tensor, size: Tensor, target: float, eligible: Tensor | None = None) -> Tensor:
    """Bool mask over the last dim: clusters in decreasing ``mass`` order while the tokens already taken are below
    ``target`` (so at least one, overshooting by less than one cluster)."""
    if eligible is not None:
        mass = mass.masked_fill(~eligible, float("-inf"))
    order = torch.sort(mass, dim=-1, descending=True, stable=True).indices
    size_sorted = size.gather(-1, order)
    before = size_sorted.cumsum(-1) - size_sorted
    take = before < target
    if eligible is not None:
        take &= eligible.gather(-1, order)
    return torch.zeros_like(take).scatter_(-1, order, take)


@register("squeezed", "decode", paper="Squeezed Attention: Accelerating Long Context Length LLM Inference (2024)")
class SqueezedAttention(DecodePolicy):
    """Read about ``budget`` tokens of the fixed context per kv head (whole clusters, found by a two-level
    centroid lookup) plus every token after it."""

    budget_is_cap = True  # a read budget: at or above the fixed context everything is read

    def __init__(self, budget: int = 2048, fine_ratio: float = 0.05, coarse_ratio: float = 0.01,
                 coarse_factor: float = 4.0, iters: int = 10):
        super().__init__(budget)
        if budget is None:
            raise TypeError("budget: expected an int (fixed-context tokens read per step), got None")
        check_fraction("fine_ratio", fine_ratio)
        check_fraction("coarse_ratio", coarse_ratio)
        if fine_ratio <= 0 or coarse_ratio <= 0:
            raise ValueError(f"fine_ratio, coarse_ratio: expected > 0, got {fine_ratio}, {coarse_ratio}")
        if coarse_ratio > fine_ratio:
            raise ValueError(f"coarse_ratio: {coarse_ratio} coarse clusters per token exceed fine_ratio="
                             f"{fine_ratio}; the coarse level groups fine centroids, so expected coarse <= fine")
        if isinstance(coarse_factor, bool) or not isinstance(coarse_factor, (int, float)) or coarse_factor < 1:
            raise ValueError(f"coarse_factor: expected a number >= 1, got {coarse_factor!r}")
        check_int("iters", iters)
        self.fine_ratio, self.coarse_ratio, self.coarse_factor, self.iters = fine_ratio, coarse_ratio, \
            coarse_factor, iters

    def apply_compress(self, layer_idx, layer):
        """Cluster the fixed context (offline, once): every head holds the same slots, slot = position."""
        S = int(layer.lengths.max())
        layer.queries, layer.compressed, layer.squeezed = None, True, None  # (a reset cache may hold old state)
        if self.budget >= S:
            return  # everything would be read
        B, H, _, D = layer.keys.shape
        keys = layer.keys[:, :, :S].to(layer.device).reshape(B * H, S, D)
        kf = max(1, min(S, math.ceil(self.fine_ratio * S)))
        kc = max(1, min(kf, math.ceil(self.coarse_ratio * S)))
        fine, assign = kmeans(keys, kf, self.iters)  # all heads at once: [B * H, S, kf] distances per chunk
        fine_size = torch.zeros(B * H, kf, device=layer.device).scatter_add_(1, assign, torch.ones_like(
            assign, dtype=torch.float32))
        coarse, parent = kmeans(fine, kc, self.iters)
        coarse = torch.zeros_like(coarse).scatter_add_(1, parent[..., None].expand(-1, -1, D), fine * fine_size[
            ..., None])  # size-weighted coarse centroids
        coarse_size = torch.zeros(B * H, kc, device=layer.device).scatter_add_(1, parent, fine_size)
        coarse = coarse / coarse_size.clamp(min=1)[..., None]
        layer.squeezed = {"n": S, "fine": fine.view(B, H, kf, D), "fine_size": fine_size.view(B, H, kf),
                          "parent": parent.view(B, H, kf), "coarse": coarse.view(B, H, kc, D),
                          "coarse_size": coarse_size.view(B, H, kc), "assign": assign.view(B, H, S)}

    def select(self, layer_idx, q, layer: LongattnLayer):
        sq = getattr(layer, "squeezed", None)
        if q.shape[2] != 1 or sq is None:
            return None
        B, Hq, _, D = q.shape
        H = layer.keys.shape[1]
        qg = q.float().view(B, H, Hq // H, D)

        def mass(centroids: Tensor, size: Tensor) -> Tensor:
            s = qg @ centroids.transpose(-1, -2) / math.sqrt(D) + size.clamp(min=1e-30).log()[:, :, None]
            return torch.softmax(s.masked_fill(size[:, :, None] == 0, float("-inf")), -1).sum(2)

        layer.note_scoring(B * H * (sq["coarse"].shape[2] + sq["fine"].shape[2]) / 2)  # centroid keys: half slots
        coarse = take_until(mass(sq["coarse"], sq["coarse_size"]), sq["coarse_size"], self.coarse_factor * self.budget,
                            sq["coarse_size"] > 0)
        eligible = coarse.gather(-1, sq["parent"]) & (sq["fine_size"] > 0)
        fine = take_until(mass(sq["fine"], sq["fine_size"]), sq["fine_size"], self.budget, eligible)
        tokens = fine.gather(-1, sq["assign"])  # [B, H, n]
        rest = torch.ones(B, H, layer.capacity - sq["n"], dtype=torch.bool, device=layer.device)
        return torch.cat([tokens, rest], -1) & layer.valid()

    def tensors(self, layer):
        sq = getattr(layer, "squeezed", None)
        return [] if sq is None else [t for t in sq.values() if isinstance(t, Tensor)]
