"""``LongattnCache``: a transformers ``Cache`` whose layers keep, per (batch, kv head), only the tokens a decode
policy chose, so heads may hold different counts. Storage per layer is ``[B, Hkv, capacity, D]`` plus per-head
lengths and each slot's absolute position; logical pages carry key min/max bounds (Quest); optional offload to
CPU memory; ``bytes_by_device()`` reports what the held tensors really occupy.

Two more layer kinds share the read path: ``WindowLayer`` keeps sinks + a ring of recent tokens (bounded whatever
the context), and ``HeadSplitLayer`` keeps a layer's kv heads in separate stores (e.g. DuoAttention's retrieval
heads full length, its streaming heads in a ``WindowLayer``) so one long head does not pad the others.

The quantised variant (KIVI-style int8/int4) lives in ``hf/quant_cache.py``; the read path is ``attend_cached``.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import NamedTuple

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from longattn.hf.kernel_read import kernel_read, use_kernel
from longattn.kernels.decode_reference import selected_pages

OFFLOAD = (None, "values", "all")
_active: dict[int, weakref.ref] = {}  # id(model config) -> the LongattnCache that was last updated for it


def available_cpu_bytes() -> int:
    """Bytes of host memory the kernel reports as available (MemAvailable); what an offload may claim."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _alloc(shape, *, dtype, device, fill=None) -> Tensor:
    """Allocate, checking host memory first for CPU tensors so an offload fails loudly before touching state."""
    device = torch.device(device)
    need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type == "cpu" and need > available_cpu_bytes():
        raise MemoryError(f"offload: cannot allocate {need / 2**20:.1f} MiB of CPU memory for the KV cache "
                          f"({available_cpu_bytes() / 2**20:.1f} MiB available); the cache was left unchanged")
    try:
        t = torch.empty(shape, dtype=dtype, device=device)
    except RuntimeError as e:  # CUDA OOM, or an allocator failure: never half-update the cache
        raise MemoryError(f"cache: allocating {need / 2**20:.1f} MiB on {device} failed ({e}); the cache was left "
                          f"unchanged") from e
    return t.fill_(fill) if fill is not None else t


class _SeenTokensLayer(CacheLayerMixin):
    """What transformers asks of a cache layer about its length, answered from ``seen`` (tokens fed so far): the
    mask covers every position, however many the layer still keeps."""

    seen: int

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1


class LongattnLayer(_SeenTokensLayer):
    """One layer's kept tokens: keys/values [B, Hkv, cap, D], ``pos`` [B, Hkv, cap] absolute positions (-1 = empty
    slot), ``lengths`` [B, Hkv] valid slots per head (valid slots are a prefix), ``seen`` = tokens ever appended.

    ``slot_state`` holds per-slot policy tensors [B, Hkv, cap] (e.g. H2O's accumulated attention) that move with
    their tokens on eviction. ``page_size`` keeps per-page key min/max [B, Hkv, n_pages, D] up to date.
    ``window`` = (sinks, recent): when set, a query at position t reads only keys at positions < sinks or > t - recent.
    ``length_range`` = (min, max) of ``lengths``, kept on the host so a decoding step never reads it back.
    ``scored_slots`` counts what query-aware policies read to choose (``note_scoring``), for the eval's read meter.
    """

    is_sliding = False
    window: tuple[int, int] | None = None
    is_compileable = False
    is_croppable = False

    def __init__(self, page_size: int | None = None, offload: str | None = None, growth: int = 8):
        super().__init__()
        if offload not in OFFLOAD:
            raise ValueError(f"offload: expected one of {OFFLOAD}, got {offload!r}")
        self.page_size, self.offload_mode, self.growth = page_size, offload, growth
        self.seen = 0
        self.length_range = (0, 0)
        self.pos = self.lengths = self.page_min = self.page_max = self.queries = None
        self.slot_state: dict[str, Tensor] = {}
        self.last_update: Tensor | None = None
        self.first_prefill = False
        self.compressed = False
        self.scored_slots = 0

    # ------------------------------------------------------------------------------------------ transformers API
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = _alloc((B, H, 0, D), dtype=self.dtype, device=self._home("keys"))
        self.values = _alloc((B, H, 0, value_states.shape[-1]), dtype=self.dtype, device=self._home("values"))
        self.pos = torch.full((B, H, 0), -1, dtype=torch.int32, device=self.device)
        self.lengths = torch.zeros(B, H, dtype=torch.int64, device=self.device)
        if self.page_size:
            self.page_min = torch.zeros(B, H, 0, D, dtype=self.dtype, device=self.device)
            self.page_max = torch.zeros_like(self.page_min)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append the new tokens; returns the inputs themselves (the attention function reads the cache through
        ``attend_cached``, or attends the inputs directly during the first prefill)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.first_prefill = self.seen == 0
        self.append(key_states, value_states)
        self.last_update = key_states
        return key_states, value_states

    def reset(self) -> None:
        self.__init__(self.page_size, self.offload_mode, self.growth)

    def note_scoring(self, slots: float) -> None:
        """A policy's selection just read the equivalent of ``slots`` kept slots (one key + one value vector each)
        on top of what it selects: page bounds, all keys for a vote. Host-side count, never a GPU wait."""
        self.scored_slots += slots

    def offload(self):  # transformers' own layer offloading is replaced by ours (``offload=``)
        return None

    def prefetch(self):
        return None

    # ------------------------------------------------------------------------------------------ storage
    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def _home(self, which: str) -> torch.device:
        if self.offload_mode == "all" or (self.offload_mode == "values" and which == "values"):
            return torch.device("cpu")
        return self.device

    def valid(self) -> Tensor:
        """Bool [B, Hkv, cap]: which slots hold a kept token."""
        return torch.arange(self.capacity, device=self.device) < self.lengths[..., None]

    def append(self, k: Tensor, v: Tensor) -> None:
        """Write n new tokens after each head's last valid slot (per-head offsets differ after eviction)."""
        n = k.shape[2]
        need = self.length_range[1] + n
        if need > self.capacity:
            # spare room (~1/8) only for decoding steps; a prompt or a later chunk (the question after a
            # question-agnostic compression) is stored exactly, so held bytes are what it keeps
            self._resize(need + (max(16, need // self.growth) if self.seen and n == 1 else 0))
        idx = self.lengths[..., None] + torch.arange(n, device=self.device)  # [B, H, n]
        self.keys.scatter_(2, _ex(idx, k.shape[-1]).to(self.keys.device), k.to(self.keys.device))
        self.values.scatter_(2, _ex(idx, v.shape[-1]).to(self.values.device), v.to(self.values.device))
        new_pos = torch.arange(self.seen, self.seen + n, device=self.device, dtype=torch.int32).expand_as(idx)
        self.pos.scatter_(2, idx, new_pos)
        for t in self.slot_state.values():
            t.scatter_(2, idx, torch.zeros((), dtype=t.dtype, device=t.device).expand_as(idx))
        self.lengths += n
        self.seen += n
        self._grow_lengths(n)
        self._refresh_pages(self.length_range[0] - n)

    def _concat(self, k: Tensor, v: Tensor) -> None:
        """Append n tokens to storage whose heads all hold the same length (quantised and shadow layers)."""
        n = k.shape[2]
        self.keys = torch.cat([self.keys, k.to(self.keys.device)], 2)
        self.values = torch.cat([self.values, v.to(self.values.device)], 2)
        pos = torch.arange(self.seen, self.seen + n, device=self.device, dtype=torch.int32)
        self.pos = torch.cat([self.pos, pos.expand(*self.pos.shape[:2], n)], 2)
        self.lengths += n
        self.seen += n
        self._grow_lengths(n)

    def _grow_lengths(self, n: int) -> None:
        self.length_range = (self.length_range[0] + n, self.length_range[1] + n)

    def set_lengths(self, lengths: Tensor) -> None:
        """Replace ``lengths`` [B, Hkv] (after eviction or an uneven write): one read-back for the host range."""
        self.lengths = lengths
        lo, hi = torch.stack([lengths.min(), lengths.max()]).tolist() if lengths.numel() else (0, 0)
        self.length_range = (int(lo), int(hi))

    def _resize(self, cap: int) -> None:
        """Reallocate every slot tensor to ``cap`` slots (allocating all first, so a failure changes nothing)."""
        keep = min(cap, self.capacity)
        # zero-filled: empty slots are masked, but 0 × garbage (NaN) would still poison p @ V
        new = {"keys": _alloc((*self.keys.shape[:2], cap, self.keys.shape[3]), dtype=self.dtype,
                              device=self.keys.device, fill=0),
               "values": _alloc((*self.values.shape[:2], cap, self.values.shape[3]), dtype=self.dtype,
                                device=self.values.device, fill=0),
               "pos": torch.full((*self.pos.shape[:2], cap), -1, dtype=torch.int32, device=self.device)}
        state = {n: torch.zeros((*t.shape[:2], cap), dtype=t.dtype, device=t.device)
                 for n, t in self.slot_state.items()}
        for name, t in new.items():
            t[:, :, :keep] = getattr(self, name)[:, :, :keep]
        for name, t in state.items():
            t[:, :, :keep] = self.slot_state[name][:, :, :keep]
        self.keys, self.values, self.pos, self.slot_state = new["keys"], new["values"], new["pos"], state

    def add_slot_state(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """A per-slot tensor [B, Hkv, cap] that follows its tokens through eviction; created zero-filled once."""
        if name not in self.slot_state:
            self.slot_state[name] = torch.zeros(self.pos.shape, dtype=dtype, device=self.device)
        return self.slot_state[name]

    def evict(self, keep: Tensor) -> None:
        """Keep only the slots where ``keep`` [B, Hkv, cap] is True (invalid slots are dropped regardless); order
        is preserved, storage shrinks to the longest head."""
        keep = keep & self.valid()
        self.set_lengths(keep.sum(-1))
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices  # kept slots first, in order
        order = order[..., :self.length_range[1]]
        keys = self.keys.gather(2, _ex(order, self.keys.shape[-1]).to(self.keys.device))
        values = self.values.gather(2, _ex(order, self.values.shape[-1]).to(self.values.device))
        pos = self.pos.gather(2, order)
        state = {n: t.gather(2, order) for n, t in self.slot_state.items()}
        self.keys, self.values, self.pos, self.slot_state = keys, values, pos, state
        self.pos.masked_fill_(~self.valid(), -1)
        self._refresh_pages(0)

    def _refresh_pages(self, first_slot: int) -> None:
        """Recompute key min/max of every page from the one holding ``first_slot`` on (invalid slots ignored); the
        pages before it are kept in place (a decoding step touches only the newest page)."""
        if not self.page_size:
            return
        ps = self.page_size
        n_pages = math.ceil(self.capacity / ps)
        p0 = max(first_slot, 0) // ps
        B, H, _, D = self.keys.shape
        tail = n_pages * ps - self.capacity
        k = torch.nn.functional.pad(self.keys[:, :, p0 * ps:].to(self.device), (0, 0, 0, tail))
        slots = torch.arange(p0 * ps, n_pages * ps, device=self.device)
        ok = (slots < self.lengths[..., None]).view(B, H, n_pages - p0, ps, 1)
        k = k.view(B, H, n_pages - p0, ps, D)
        big = torch.finfo(k.dtype).max
        lo = k.masked_fill(~ok, big).amin(3)
        hi = k.masked_fill(~ok, -big).amax(3)
        if self.page_min.shape[2] == n_pages:
            self.page_min[:, :, p0:], self.page_max[:, :, p0:] = lo, hi
        else:
            self.page_min = torch.cat([self.page_min[:, :, :p0], lo], 2)
            self.page_max = torch.cat([self.page_max[:, :, :p0], hi], 2)

    def page_valid(self) -> Tensor:
        """Bool [B, Hkv, n_pages]: pages holding at least one kept token."""
        return torch.arange(self.page_min.shape[2], device=self.device) * self.page_size < self.lengths[..., None]

    def kv(self) -> tuple[Tensor, Tensor]:
        """Keys and values [B, Hkv, cap, D] on the compute device (dequantised by subclasses)."""
        return self.keys.to(self.device, non_blocking=True), self.values.to(self.device, non_blocking=True)

    def kept_positions(self, b: int = 0, h: int = 0) -> list[int]:
        """Absolute positions of the tokens kept for (batch b, kv head h), in storage order."""
        return self.pos[b, h, : int(self.lengths[b, h])].tolist()

    def tensors(self) -> list[Tensor]:
        """Every tensor this layer holds (what ``bytes_by_device`` counts)."""
        held = [self.keys, self.values, self.pos, self.lengths, self.page_min, self.page_max, self.queries,
                *self.slot_state.values()]
        return [t for t in held if t is not None]

    def kv_tensors(self) -> list[Tensor]:
        """The tensors holding the kept keys and values themselves (``bytes_by_device(kv_only=True)``), without
        positions, lengths, page bounds or policy state."""
        return [t for t in (self.keys, self.values) if t is not None]

    def kv_shape(self) -> tuple[int, int, int, int]:
        """(batch, kv heads, key head dim, value head dim) of the layer's tokens."""
        return (*self.keys.shape[:2], self.keys.shape[3], self.values.shape[3])

    def after_read(self) -> None:
        """Housekeeping after a cached attention call has read this layer (``WindowLayer`` folds a chunk)."""


class WindowLayer(LongattnLayer):
    """Attention sinks + the ``recent`` newest tokens, the same positions for every head: between calls at most
    ``sinks + recent`` slots, however long the context. The token at absolute position p lives in slot p while
    p < sinks + recent, then in ``sinks + (p - sinks) % recent`` (a ring), so a decoding step overwrites exactly the
    token that just left the window, in place. The prompt keeps only its sinks and last ``recent`` tokens (the first
    prefill attends the prompt itself, not the cache). A later multi-token chunk is written behind the ring (its
    early queries still need tokens that its later ones push out; ``window`` masks each query's reach) and folded
    back into the ring by ``after_read`` or the next update. No pages, no policy slot state, no eviction."""

    def __init__(self, sinks: int, recent: int, offload: str | None = None):
        super().__init__(offload=offload)
        self.window = (sinks, recent)
        self.unfolded = False  # a chunk sits behind the ring

    @property
    def size(self) -> int:
        return self.window[0] + self.window[1]

    def reset(self) -> None:
        self.__init__(*self.window, self.offload_mode)

    def slot(self, pos: Tensor) -> Tensor:
        """Ring slot of each absolute position (for positions still inside the window)."""
        sinks, recent = self.window
        return torch.where(pos < sinks, pos, sinks + (pos - sinks) % recent)

    def in_window(self, pos: Tensor, seen: int) -> Tensor:
        """Positions a query at ``seen`` (the next token) may still read: sinks or the last ``recent`` tokens."""
        sinks, recent = self.window
        return (pos < sinks) | (pos >= seen - recent)

    def append(self, k: Tensor, v: Tensor) -> None:
        if self.unfolded:
            self.after_read()
        n = k.shape[2]
        s0, s1 = self.seen, self.seen + n
        pos = torch.arange(s0, s1, device=self.device)
        held = self.length_range[1]
        if s1 <= self.size:  # nothing has left the window yet: slot = position
            if s1 > self.capacity:
                self._resize(s1 if n > 1 else min(self.size, s1 + max(16, s1 // self.growth)))
            slots, held = pos, s1
        elif n == 1 or s0 == 0:  # a decoding step, or the prompt: keep what stays in the window, ring layout
            keep = self.in_window(pos, s1)
            k, v, pos = k[:, :, keep], v[:, :, keep], pos[keep]
            if self.capacity < self.size:
                self._resize(self.size)
            slots, held = self.slot(pos), self.size
        else:  # a later chunk: behind the ring until the read is done
            self._resize(held + n)
            slots, held = torch.arange(held, held + n, device=self.device), held + n
            self.unfolded = True
        self.keys[:, :, slots.to(self.keys.device)] = k.to(self.keys.device)
        self.values[:, :, slots.to(self.values.device)] = v.to(self.values.device)
        self.pos[:, :, slots] = pos.to(torch.int32)
        self.lengths.fill_(held)
        self.length_range = (held, held)
        self.seen = s1

    def after_read(self) -> None:
        """Fold a chunk written behind the ring back into ``sinks + recent`` ring slots."""
        if not self.unfolded:
            return
        self.unfolded = False
        pos = self.pos[0, 0].long()
        keep = (pos >= 0) & self.in_window(pos, self.seen)
        src, pos = keep.nonzero().flatten(), pos[keep]
        dst = self.slot(pos)
        order = torch.empty_like(dst).scatter_(0, dst, src)  # ring slot -> the slot holding its token now
        idx = {t.device: order.to(t.device) for t in (self.keys, self.values)}
        self.keys = self.keys.index_select(2, idx[self.keys.device])
        self.values = self.values.index_select(2, idx[self.values.device])
        self.pos = self.pos.index_select(2, order)
        self.lengths.fill_(len(order))
        self.length_range = (len(order), len(order))

    def evict(self, keep: Tensor) -> None:
        raise NotImplementedError("WindowLayer keeps sinks + recent tokens by position; it does not evict")


class HeadSplitLayer(_SeenTokensLayer):
    """One attention layer whose kv heads live in separate stores, each a ``LongattnLayer`` (or subclass) holding
    only its heads, e.g. DuoAttention: retrieval heads in a full-length layer, streaming heads in a ``WindowLayer``.
    A layer's bytes are then the sum of what each group needs, not every head padded to the longest one.
    ``parts``: (kv head indices, layer) pairs covering each kv head exactly once. ``attend_cached`` reads each part
    with the query heads of its kv heads (GQA) and writes the outputs back into those heads' places."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, parts: list[tuple[list[int], LongattnLayer]]):
        super().__init__()
        heads = [h for hs, _ in parts for h in hs]
        if not parts or len(set(heads)) != len(heads) or any(not hs for hs, _ in parts):
            raise ValueError(f"parts: expected non-empty, disjoint kv head groups, got {[hs for hs, _ in parts]}")
        self.parts = [(list(hs), layer) for hs, layer in parts]
        self.seen = 0
        self.queries = self.last_update = self.index = None
        self.first_prefill = self.compressed = False

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        H = key_states.shape[1]
        if sorted(h for hs, _ in self.parts for h in hs) != list(range(H)):
            raise ValueError(f"parts: kv head groups {[hs for hs, _ in self.parts]} do not cover the layer's {H} "
                             f"kv heads exactly once")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.index = [torch.tensor(hs, device=self.device) for hs, _ in self.parts]
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.first_prefill = self.seen == 0
        for idx, (_, layer) in zip(self.index, self.parts, strict=True):
            layer.update(key_states.index_select(1, idx), value_states.index_select(1, idx))
        self.seen += key_states.shape[2]
        self.last_update = key_states
        return key_states, value_states

    def reset(self) -> None:
        for _, layer in self.parts:
            layer.reset()
        self.__init__(self.parts)

    def offload(self):
        return None

    def prefetch(self):
        return None

    @property
    def lengths(self) -> Tensor:
        """Kept tokens per (batch, kv head) [B, Hkv], assembled from the parts."""
        B = self.parts[0][1].lengths.shape[0]
        out = torch.empty(B, sum(len(hs) for hs, _ in self.parts), dtype=torch.int64, device=self.device)
        for idx, (_, layer) in zip(self.index, self.parts, strict=True):
            out[:, idx] = layer.lengths
        return out

    def kept_positions(self, b: int = 0, h: int = 0) -> list[int]:
        hs, layer = next((hs, layer) for hs, layer in self.parts if h in hs)
        return layer.kept_positions(b, hs.index(h))

    def kv_shape(self) -> tuple[int, int, int, int]:
        B, _, dk, dv = self.parts[0][1].kv_shape()
        return B, sum(len(hs) for hs, _ in self.parts), dk, dv

    def tensors(self) -> list[Tensor]:
        return [t for _, layer in self.parts for t in layer.tensors()]

    def kv_tensors(self) -> list[Tensor]:
        return [t for _, layer in self.parts for t in layer.kv_tensors()]

    def after_read(self) -> None:
        for _, layer in self.parts:
            layer.after_read()


def _ex(idx: Tensor, d: int) -> Tensor:
    return idx[..., None].expand(*idx.shape, d)


class LongattnCache(Cache):
    """A transformers Cache of ``LongattnLayer`` driven by a decode policy; pass it as the model's cache argument
    (or let the patched ``generate`` build one). ``auto_compress=False`` defers eviction to an explicit ``compress()``:
    the question-agnostic setting (prefill the context, compress, then feed the question)."""

    # transformers keeps a ``layers`` list; ``policy`` decides what each layer keeps and reads
    def __init__(self, policy, num_layers: int, *, offload: str | None = None, auto_compress: bool = True,
                 config_key: int | None = None):
        if offload not in OFFLOAD:
            raise ValueError(f"offload: expected one of {OFFLOAD}, got {offload!r}")
        layers = [policy.make_layer(i, offload=offload) for i in range(num_layers)]
        super().__init__(layers=layers)
        self.policy, self.auto_compress, self.config_key = policy, auto_compress, config_key

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        if self.config_key is not None:
            _active[self.config_key] = weakref.ref(self)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def after_prefill(self, layer_idx: int, query: Tensor) -> None:
        """End of a layer's first prefill: keep the prompt queries the policy asks for; compress if automatic."""
        layer, w = self.layers[layer_idx], self.policy.query_window
        if w != 0:
            layer.queries = (query if w is None else query[:, :, -w:]).clone()
        if self.auto_compress:
            self.policy.apply_compress(layer_idx, layer)

    def compress(self) -> None:
        """Evict now with the captured prompt queries (question-agnostic use: call after a context-only prefill)."""
        for i, layer in enumerate(self.layers):
            if layer.is_initialized and not layer.compressed:
                self.policy.apply_compress(i, layer)

    def bytes_by_device(self, kv_only: bool = False) -> dict[str, int]:
        """Bytes held per device, from the storage of every tensor actually held (shared storage counted once).
        kv_only: count only the key/value payload (``LongattnLayer.kv_tensors``), not the bookkeeping."""
        out: dict[str, int] = {}
        seen: set[tuple[str, int]] = set()
        for layer in self.layers:
            for t in layer.kv_tensors() if kv_only else layer.tensors() + self.policy.tensors(layer):
                key = (str(t.device), t.untyped_storage().data_ptr())
                if key in seen:
                    continue
                seen.add(key)
                out[str(t.device)] = out.get(str(t.device), 0) + t.untyped_storage().nbytes()
        return out


def active_layer(config, layer_idx: int, key: Tensor) -> tuple[LongattnCache, LongattnLayer] | tuple[None, None]:
    """The LongattnCache layer whose last ``update`` returned ``key``, or (None, None) when the model runs on
    another cache (then attention is plain)."""
    ref = _active.get(id(config))
    cache = ref() if ref is not None else None
    if cache is None or layer_idx >= len(cache.layers) or cache.layers[layer_idx].last_update is not key:
        return None, None
    return cache, cache.layers[layer_idx]



class PageSelection(NamedTuple):
    """Pages to read per (batch, head), what the decode kernel reads: the first ``counts`` [B, H'] entries of
    ``indices`` [B, H', n] are logical pages of ``page_size`` slots (distinct); H' = Hkv (one set per kv head) or Hq
    (one per query head)."""

    indices: Tensor
    counts: Tensor
    page_size: int

    def slots(self, capacity: int) -> Tensor:
        """bool [B, H', capacity]: the slots of the selected pages (the torch read path's form)."""
        chosen = selected_pages(self.indices, self.counts, math.ceil(capacity / self.page_size))
        return chosen.repeat_interleave(self.page_size, -1)[..., :capacity]


Selection = Tensor | PageSelection  # bool slots [B, Hkv or Hq or 1, cap], or pages


def cached_logits(q: Tensor, layer: LongattnLayer, selection: Tensor | None = None, *, scale: float | None = None,
                  attention_mask: Tensor | None = None, sliding_window: int | None = None) -> Tensor:
    """Scaled scores [B, Hkv, group, Sq, cap] (float32) of q [B, Hq, Sq, D] — the cache's last Sq positions —
    against each head's kept tokens; -inf where a slot is empty, in the future, padded, outside the model's
    sliding window, or not in ``selection`` (bool [B, Hkv or Hq, cap])."""
    keys = layer.kv()[0]
    B, Hq, Sq, D = q.shape
    Hkv, cap = keys.shape[1], keys.shape[2]
    g = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qpos = torch.arange(layer.seen - Sq, layer.seen, device=q.device)[:, None]  # [Sq, 1]
    pos = layer.pos[:, :, None, :].long()  # [B, Hkv, 1, cap]
    allowed = layer.valid()[:, :, None, :] & (pos <= qpos)
    if sliding_window:
        allowed = allowed & (pos > qpos - int(sliding_window))
    if layer.window is not None:
        allowed = allowed & ((pos < layer.window[0]) | (pos > qpos - layer.window[1]))
    if attention_mask is not None:
        am = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        am = am[:, :1, -Sq:].expand(B, Hkv, Sq, am.shape[-1])
        allowed = allowed & am.gather(3, pos.clamp(min=0).expand(B, Hkv, Sq, cap))
    allowed = allowed[:, :, None]  # [B, Hkv, 1, Sq, cap]
    if selection is not None:
        hs = selection.shape[1]  # Hq (per query head), Hkv, or 1 (shared by all heads)
        allowed = allowed & (selection.view(B, Hkv, g, 1, cap) if hs == Hq else selection.view(B, hs, 1, 1, cap))
    s = q.view(B, Hkv, g, Sq, D).float() @ keys.float()[:, :, None].transpose(-1, -2) * scale
    bias = layer.slot_state.get("logit_bias")
    if bias is not None:
        s = s + bias[:, :, None, None, :]
    return s.masked_fill(~allowed, float("-inf"))


def attend_cached(q: Tensor, layer: LongattnLayer, selection: Selection | None = None, **kwargs) -> Tensor:
    """THE cached read path: attention of q [B, Hq, Sq, D] over the kept (and, if given, selected) tokens of each
    head; out [B, Hq, Sq, D]. On CUDA a single-token read runs the Triton decode kernel (``kernel_read.py``); the
    torch path here is the CPU path and its oracle. A ``HeadSplitLayer`` is read part by part (no ``selection``
    there)."""
    if isinstance(layer, HeadSplitLayer):
        return _attend_split(q, layer, selection, **kwargs)
    if use_kernel(q, layer, selection, kwargs.get("attention_mask"), kwargs.get("sliding_window")):
        return kernel_read(q, layer, kwargs.get("scale"), selection)
    if isinstance(selection, PageSelection):
        selection = selection.slots(layer.capacity)
    B, Hq, Sq, D = q.shape
    values = layer.kv()[1]
    p = torch.softmax(cached_logits(q, layer, selection, **kwargs), dim=-1).nan_to_num_(0.0)
    out = p @ values.float()[:, :, None]
    return out.reshape(B, Hq, Sq, values.shape[-1]).to(q.dtype)


def _attend_split(q: Tensor, layer: HeadSplitLayer, selection: Tensor | None, **kwargs) -> Tensor:
    """Each part attends with the query heads of its kv heads; outputs land back in those heads' places."""
    if selection is not None:
        raise ValueError("selection: a HeadSplitLayer's parts hold different slot counts; per-slot selections are "
                         "not supported on it (return None from select)")
    B, Hq, Sq, D = q.shape
    Hkv = sum(len(hs) for hs, _ in layer.parts)
    g = Hq // Hkv
    qg = q.view(B, Hkv, g, Sq, D)
    out = None
    for idx, (hs, part) in zip(layer.index, layer.parts, strict=True):
        o = attend_cached(qg.index_select(1, idx).reshape(B, len(hs) * g, Sq, D), part, **kwargs)
        if out is None:  # NaN-filled: a head no part wrote would show
            out = torch.full((B, Hkv, g, Sq, o.shape[-1]), float("nan"), dtype=o.dtype, device=o.device)
        out.index_copy_(1, idx, o.view(B, len(hs), g, Sq, -1))
    return out.view(B, Hq, Sq, -1)
