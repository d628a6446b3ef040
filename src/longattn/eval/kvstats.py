"""What a decode run's KV cache holds and reads, for the eval rows.

- ``held_bytes``: bytes per side (GPU / CPU) from the storage of every tensor the cache holds (``LongattnCache.
  bytes_by_device``: keys, values, positions, lengths, page bounds, policy state; for transformers' dense cache the
  keys and values), plus the key/value payload alone.
- ``dense_bytes``: computed from the shapes (not measured): layers × batch × kv heads × tokens × (key + value
  head dims) × the element size of the model's cache dtype, i.e. what transformers' dense ``DynamicCache`` holds for
  the same tokens (tests/eval checks it against a real DynamicCache).
- ``ReadMeter``: for query-aware policies (those that override ``DecodePolicy.select``), the fraction of the kept
  KV entries a decode step reads. It records the selection each ``select`` call returns (a kv slot counts as read
  when any query head of its group selects it; ``None`` means the layer reads every kept slot) plus what the
  selection itself read to choose (``LongattnLayer.note_scoring``: Quest's page bounds, TokenSelect's key vote,
  InfLLM's representative keys, Squeezed's centroids, ShadowKV's landmarks; not RetrievalAttention's CPU index
  search), and sums read and held slots over layers, kv heads and steps; ``scoring_fraction`` is the choosing part
  alone.
  Policies that keep a subset but read all of it give ``None``: their cost is the kept bytes, not a read fraction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.hf.cache import PageSelection
from longattn.methods.decode.base import DecodePolicy


def _storage_bytes(tensors) -> dict[str, int]:
    out: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    for t in tensors:
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            out[str(t.device)] = out.get(str(t.device), 0) + t.untyped_storage().nbytes()
    return out


def _sides(by_device: dict[str, int]) -> tuple[int, int]:
    cpu = sum(v for k, v in by_device.items() if k == "cpu")
    return sum(by_device.values()) - cpu, cpu


def _kv_layers(cache) -> list:
    return [layer for layer in cache.layers if getattr(layer, "is_initialized", False)]


def held_bytes(cache) -> dict[str, int]:
    """``{"gpu", "cpu", "kv"}``: all bytes held per side, and the key/value payload bytes (both sides)."""
    from longattn.hf.cache import LongattnCache

    if isinstance(cache, LongattnCache):
        gpu, cpu = _sides(cache.bytes_by_device())
        kv = sum(cache.bytes_by_device(kv_only=True).values())
    else:  # transformers' dense cache: keys and values are all it holds
        by = _storage_bytes(t for layer in _kv_layers(cache) for t in (layer.keys, layer.values))
        gpu, cpu = _sides(by)
        kv = gpu + cpu
    return {"gpu": gpu, "cpu": cpu, "kv": kv}


def dense_bytes(cache, tokens: int) -> int:
    """Bytes a dense cache holds for ``tokens`` tokens in every layer, computed from the layers' shapes and dtype."""
    total = 0
    for layer in _kv_layers(cache):
        if hasattr(layer, "kv_shape"):  # longattn layers (a head-split layer has no single keys tensor)
            B, H, Dk, Dv = layer.kv_shape()
        else:
            B, H, _, Dk = layer.keys.shape
            Dv = layer.values.shape[-1]
        # a quantised layer's dtype is the unquantised one; a head-split layer has no keys tensor of its own
        dtype = layer.dtype if hasattr(layer, "dtype") else layer.keys.dtype
        total += B * H * tokens * (Dk + Dv) * torch.empty((), dtype=dtype).element_size()
    return total


def query_aware(policy) -> bool:
    """Whether the policy chooses what to read per step (overrides ``select``)."""
    return policy is not None and type(policy).select is not DecodePolicy.select


class ReadMeter:
    """``with ReadMeter(policy) as m:`` around decode steps, ``m.flush()`` after each (outside any timer: it reads
    the recorded selections back), then ``m.fraction`` (None when the policy is not query-aware or nothing ran)."""

    def __init__(self, policy):
        self.policy = policy if query_aware(policy) else None
        self.pending: list[tuple[Tensor | None, Tensor, float]] = []  # (selected slots, lengths, scored slots)
        self.read = self.held = self.scored = 0

    def __enter__(self) -> ReadMeter:
        if self.policy is not None:
            select = self.policy.select

            def recording_select(layer_idx, q, layer):
                before = layer.scored_slots
                sel = select(layer_idx, q, layer)
                slots = sel.slots(layer.capacity) if isinstance(sel, PageSelection) else sel
                self.pending.append((slots, layer.lengths.clone(), layer.scored_slots - before))
                return sel

            self.policy.select = recording_select  # instance attribute, removed on exit
        return self

    def __exit__(self, *exc) -> None:
        if self.policy is not None:
            self.policy.__dict__.pop("select", None)

    def flush(self) -> None:
        for sel, lengths, scored in self.pending:
            self.read += scored
            self.scored += scored
            if sel is None:  # this layer read every kept slot
                n = int(lengths.sum())
                self.read, self.held = self.read + n, self.held + n
                continue
            B, hs, cap = sel.shape
            Hkv = lengths.shape[1]
            valid = torch.arange(cap, device=lengths.device) < lengths[..., None]  # [B, Hkv, cap]
            s = sel.view(B, Hkv, hs // Hkv, cap).any(2) if hs > Hkv else sel.expand(B, Hkv, cap)
            self.read += int((s.to(valid.device) & valid).sum())
            self.held += int(valid.sum())
        self.pending.clear()

    @property
    def fraction(self) -> float | None:
        return None if self.policy is None or not self.held else self.read / self.held

    @property
    def scoring_fraction(self) -> float | None:
        return None if self.policy is None or not self.held else self.scored / self.held
