"""InfLLM (Xiao et al., 2024): training-free context memory. The first ``n_init`` tokens (attention sinks) and the
newest ``n_local`` tokens are always read; the context in between is cut into memory units of ``block_size``
tokens. Each unit is represented by its ``repr_topk`` representative tokens: those whose keys received the most
attention (mean q·k) from the queries of their own unit (causally, so later queries of the unit vote for earlier
keys). At every decoding step the query scores each unit by the sum of q·k over its representatives (and over
the GQA group), and the top ``topk`` units are read besides the sinks and the local window.

Defaults are the paper's Mistral-7B setting: 128 initial tokens, a 4096-token local window, units of 128 tokens
with 4 representatives, 16 units looked up per step. Nothing is evicted (the paper parks the units in CPU
memory: pass ``offload="values"`` or ``"all"`` to the cache for that); a slot's index is its absolute position.

Representative scores need the prompt's queries, captured at the end of prefill (``query_window = None``) and
freed at ``compress`` (scored ``chunk`` queries at a time to bound memory); tokens fed later (decoded, or a later
chunk) score their own unit's keys as they go.

Deviation from the paper: InfLLM gives every memory token one shared position (the local window's size) so that
a model can run beyond its trained length. Here keys are cached after the model's own RoPE, so memory tokens keep
their real positions: the policy saves compute within the trained context, it does not extend it."""

from __future__ import annotations

import torch
from torch import Tensor

from longattn.hf.cache import LongattnLayer
from longattn.methods.decode.base import DecodePolicy, check_int, topk_mask
from longattn.methods.registry import register


@register("infllm", "decode", paper="InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient "
                                    "Context Memory (2024)")
class InfLLM(DecodePolicy):
    """Read ``n_init`` sinks + the ``n_local`` newest tokens (rounded down to whole units) + ``topk`` memory units
    of ``block_size`` tokens, looked up per kv head by query · representative keys."""

    query_window = None  # every prompt query: each unit's own queries score its keys

    def __init__(self, n_init: int = 128, n_local: int = 4096, block_size: int = 128, repr_topk: int = 4,
                 topk: int = 16, chunk: int = 512):
        super().__init__(None)
        check_int("n_init", n_init, minimum=0)
        check_int("n_local", n_local)
        check_int("block_size", block_size)
        check_int("repr_topk", repr_topk)
        check_int("topk", topk)
        check_int("chunk", chunk)
        if repr_topk > block_size:
            raise ValueError(f"repr_topk: {repr_topk} representative tokens do not fit in a memory unit of "
                             f"block_size={block_size} tokens; expected repr_topk <= block_size")
        self.n_init, self.n_local, self.block_size = n_init, n_local, block_size
        self.repr_topk, self.topk, self.chunk = repr_topk, topk, chunk

    # ------------------------------------------------------------------------------------- representative scores
    def _unit_start(self, p: int) -> int:
        return p if p < self.n_init else self.n_init + (p - self.n_init) // self.block_size * self.block_size

    def accumulate(self, layer: LongattnLayer, q: Tensor, q0: int) -> None:
        """Add, to each key's representative score, q·k from the queries q [B, Hq, n, D] (at absolute positions
        q0 ... q0 + n - 1) of the same memory unit at or after the key (summed over the GQA group)."""
        B, Hq, n, D = q.shape
        Hkv = layer.keys.shape[1]
        g = Hq // Hkv
        rsum, rcnt = layer.add_slot_state("infllm_rsum"), layer.add_slot_state("infllm_rcnt")
        for a in range(0, n, self.chunk):
            b = min(n, a + self.chunk)
            pa, pb = q0 + a, q0 + b
            lo = self._unit_start(pa)
            k = layer.keys[:, :, lo:pb].to(layer.device).float()
            s = q[:, :, a:b].float().reshape(B, Hkv, g, b - a, D) @ k[:, :, None].transpose(-1, -2)
            qpos = torch.arange(pa, pb, device=layer.device)[:, None]
            kpos = torch.arange(lo, pb, device=layer.device)[None]
            unit = lambda p: (p - self.n_init).div(self.block_size, rounding_mode="floor")
            same = (unit(qpos) == unit(kpos)) & (kpos <= qpos) & (kpos >= self.n_init)  # [n_q, n_k]
            rsum[:, :, lo:pb] += s.masked_fill(~same, 0.0).sum((2, 3))
            rcnt[:, :, lo:pb] += same.sum(0).to(rcnt.dtype)

    def apply_compress(self, layer_idx, layer):
        layer.infllm = None  # (a reset cache may hold old representatives)
        if layer.queries is not None:
            self.accumulate(layer, layer.queries, layer.seen - layer.queries.shape[2])
        super().apply_compress(layer_idx, layer)

    def after_step(self, layer_idx, q, layer):
        self.accumulate(layer, q, layer.seen - q.shape[2])

    # ------------------------------------------------------------------------------------- lookup
    def memory_units(self, seen: int) -> int:
        """Complete units lying wholly before the local window."""
        return max(0, (seen - self.n_local - self.n_init) // self.block_size)

    def representatives(self, layer: LongattnLayer, m: int) -> Tensor:
        """Slots [B, Hkv, m, repr_topk] of each memory unit's representative tokens (cached per unit count: a
        memory unit's scores are final once it has left the local window)."""
        cached = getattr(layer, "infllm", None)
        if cached is not None and cached[0] == m:
            return cached[1]
        bs, lo = self.block_size, self.n_init
        rsum, rcnt = layer.add_slot_state("infllm_rsum"), layer.add_slot_state("infllm_rcnt")
        r = rsum[:, :, lo:lo + m * bs] / rcnt[:, :, lo:lo + m * bs].clamp(min=1)
        B, H = r.shape[:2]
        top = r.view(B, H, m, bs).topk(self.repr_topk, -1, sorted=False).indices
        reps = top + lo + torch.arange(m, device=r.device)[:, None] * bs
        layer.infllm = (m, reps)
        return reps

    def select(self, layer_idx, q, layer):
        if q.shape[2] != 1:
            return None
        if not layer.compressed:
            raise ValueError("infllm: the representative tokens are scored at compress(); call cache.compress() "
                             "after a context-only prefill (auto_compress=False) before decoding")
        m = self.memory_units(layer.seen)
        if m <= self.topk:
            return None  # every memory unit would be read: the whole cache
        B, Hq, _, D = q.shape
        Hkv, cap, bs = layer.keys.shape[1], layer.capacity, self.block_size
        reps = self.representatives(layer, m)
        idx = reps.flatten(2)[..., None].expand(B, Hkv, m * self.repr_topk, D).to(layer.keys.device)
        kr = layer.keys.gather(2, idx).to(layer.device).float().view(B, Hkv, m, self.repr_topk, D)
        scores = torch.einsum("bhgd,bhmrd->bhm", q.float().view(B, Hkv, Hq // Hkv, D), kr)
        layer.note_scoring(B * Hkv * m * self.repr_topk / 2)  # the representative keys (half a slot each)
        units = topk_mask(scores, self.topk)  # [B, Hkv, m]
        chosen = torch.zeros(B, Hkv, cap, dtype=torch.bool, device=layer.device)
        chosen[:, :, self.n_init:self.n_init + m * bs] = units.repeat_interleave(bs, -1)
        slot = torch.arange(cap, device=layer.device)
        fixed = (slot < self.n_init) | (slot >= self.n_init + m * bs)
        return (chosen | fixed) & layer.valid()

    def tensors(self, layer):
        cached = getattr(layer, "infllm", None)
        return [] if cached is None else [cached[1]]
