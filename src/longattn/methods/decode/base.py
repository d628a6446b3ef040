"""The decode-policy contract: what a layer keeps after prefill (``compress``), what it reads at each step
(``select``), what it drops as decoding goes on (``after_step``). Budgets are tokens per kv head.

A policy never launches kernels: it returns keep masks and slot selections; ``LongattnCache`` stores and
``attend_cached`` reads. ``compress`` runs at the end of prefill (question-aware) or when the user calls
``cache.compress()`` after a context-only prefill (question-agnostic)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from longattn.hf.cache import LongattnLayer


def check_int(name: str, value, *, minimum: int = 1, allow_none: bool = False) -> None:
    """Knob validation at the boundary: an int ≥ minimum (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def check_fraction(name: str, value: float, *, low: float = 0.0, high: float = 1.0) -> None:
    """A float knob in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name}: expected a number in [{low}, {high}], got {value!r}")


class DecodePolicy:
    """Base class. ``query_window``: prompt queries to capture for ``compress`` (0 = none, None = all).
    ``budget_is_cap``: the budget bounds the cache at every step (StreamingLLM, H2O) instead of naming a
    compression target, so a budget above the context is legal."""

    query_window: int | None = 0
    page_size: int | None = None
    budget_is_cap = False

    def __init__(self, budget: int | None = None):
        check_int("budget", budget, allow_none=True)
        self.budget = budget
        self.num_layers = 0

    def bind(self, config) -> None:
        """Learn the model's shape once (layer count, heads) when the policy is attached to a model."""
        self.num_layers = int(getattr(config, "num_hidden_layers", 0))

    def make_layer(self, layer_idx: int, offload: str | None = None) -> LongattnLayer:
        """The cache layer this policy needs (pages, quantisation)."""
        return LongattnLayer(page_size=self.page_size, offload=offload)

    def compress(self, layer_idx: int, keys: Tensor, values: Tensor, queries: Tensor | None,
                 positions: Tensor) -> Tensor | None:
        """Keep mask [B, Hkv, S] for the prompt's keys/values [B, Hkv, S, D] (queries: the captured last prompt
        queries [B, Hq, w, D]; positions [B, Hkv, S]); None keeps everything."""
        return None

    def select(self, layer_idx: int, q: Tensor, layer: LongattnLayer) -> Tensor | None:
        """Slots to read for this step, bool [B, Hkv or Hq, cap], or pages (``PageSelection``: what the GPU decode
        kernel reads directly); None reads every kept token."""
        return None

    def after_step(self, layer_idx: int, q: Tensor, layer: LongattnLayer) -> None:
        """Called after each cached attention call (decoding): decode-time eviction and statistics."""

    def tensors(self, layer: LongattnLayer) -> list[Tensor]:
        """Tensors the policy holds for ``layer`` outside the cache (counted in ``bytes_by_device``)."""
        return []

    def check_budget(self, budget: int, context: int) -> None:
        """A compression target above the context is a mistake (use budget ≥ context only for caps)."""
        if not self.budget_is_cap and budget > context:
            raise ValueError(f"budget: {budget} tokens per head exceeds the context ({context} tokens); pass a "
                             f"budget <= {context}, or use no decode policy to keep everything")

    def apply_compress(self, layer_idx: int, layer: LongattnLayer) -> None:
        """Run ``compress`` on a layer's stored prompt and evict; frees the captured queries."""
        if self.budget is not None:
            self.check_budget(self.budget, layer.seen)
        n = int(layer.lengths.max())
        keys, values = layer.kv()
        keep = self.compress(layer_idx, keys[:, :, :n], values[:, :, :n], layer.queries, layer.pos[:, :, :n])
        if keep is not None:
            layer.evict(torch.nn.functional.pad(keep, (0, layer.capacity - n)))
        layer.queries = None
        layer.compressed = True


def window_votes(keys: Tensor, queries: Tensor, *, chunk: int = 256) -> Tensor:
    """Attention mass [B, Hkv, S] (float32) that the given last-of-prompt queries [B, Hq, w, D] put on each key
    of keys [B, Hkv, S, D], causal (query i sits at position S - w + i), summed over queries and GQA group."""
    B, Hq, w, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    g = Hq // Hkv
    k = keys.float()[:, :, None]
    total = torch.zeros(B, Hkv, S, dtype=torch.float32, device=keys.device)
    for lo in range(0, w, chunk):
        hi = min(w, lo + chunk)
        q = queries[:, :, lo:hi].float().reshape(B, Hkv, g, hi - lo, D)
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        qpos = torch.arange(S - w + lo, S - w + hi, device=keys.device)[:, None]
        s = s.masked_fill(torch.arange(S, device=keys.device) > qpos, float("-inf"))
        total += torch.softmax(s, -1).sum((2, 3))
    return total


def pool1d(scores: Tensor, kernel: int, kind: str) -> Tensor:
    """Smooth per-key scores [B, H, S] along the sequence (odd kernel, same length): clustered tokens survive
    together (SnapKV's pooling)."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    B, H, S = scores.shape
    x = scores.reshape(B * H, 1, S)
    if kind == "max":
        x = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        x = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return x.reshape(B, H, S)


def topk_mask(scores: Tensor, k: int, eligible: Tensor | None = None) -> Tensor:
    """Bool mask of the k highest scores along the last dim (ties: lowest index), among ``eligible``."""
    if eligible is not None:
        scores = scores.masked_fill(~eligible, float("-inf"))
    k = max(0, min(k, scores.shape[-1]))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(-1, scores.topk(k, dim=-1, sorted=False).indices, True)
    if eligible is not None:
        mask &= eligible
    return mask


def positions_mask(positions: Tensor, valid: Tensor, *, first: int, last: int, seen: int) -> Tensor:
    """Bool mask of slots whose absolute position is among the ``first`` sinks or the ``last`` recent tokens."""
    pos = positions.long()
    return valid & ((pos < first) | (pos >= seen - last))
