"""Softplus attention with length scaling and re-weighting (after Gao & Spratling 2025, "Softplus Attention with
Re-weighting Boosts Length Extrapolation"): softmax split into a positive map and an l1 normalisation, with the
exponential replaced by softplus of the scores scaled by log(n) (n = keys the query sees, keeping the attention
entropy steady as n grows), then sharpened by raising the weights to a power p and renormalising. NOT a recurrence
(the weights are normalised over all visible keys): parallel form only, tested against a per-query loop."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longattn.methods.registry import register


@register("softplus", "linear", paper="Softplus Attention with Re-weighting (Gao & Spratling 2025)", impls=("torch",))
class SoftplusAttention(nn.Module):
    """a_ij ∝ softplus(log(i + 1) q_i.k_j / sqrt(d)) for j <= i, l1-normalised, then a^p renormalised (p >= 1)."""

    def __init__(self, d_model: int, n_heads: int, *, power: float = 2.0, chunk: int = 128):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if not (isinstance(power, (int, float)) and math.isfinite(power) and power >= 1):
            raise ValueError(f"power: expected a finite number >= 1 (1 = no re-weighting), got {power!r}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.power, self.chunk = float(power), chunk
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def cache_bytes(self, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """What decoding must keep: the KV cache."""
        return 2 * batch * seq_len * self.d_model * torch.empty((), dtype=dtype).element_size()

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected [B, S, d_model={self.d_model}], got {tuple(x.shape)}")
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def _weights(self, scores: Tensor, visible: Tensor) -> Tensor:
        """Rows of scores [..., n_keys] with a bool mask of visible keys -> attention weights."""
        n = visible.sum(-1, keepdim=True).clamp(min=1).to(scores.dtype)
        w = F.softplus(scores * torch.log(n + 1)).masked_fill(~visible, 0)
        w = w / w.sum(-1, keepdim=True)
        w = w ** self.power
        return w / w.sum(-1, keepdim=True)

    def _out(self, o: Tensor) -> Tensor:
        B, H, S, D = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * D))

    def forward(self, x: Tensor) -> Tensor:
        """Query chunks against all keys: memory O(chunk x S), never the full S x S at once."""
        q, k, v = self._heads(x)
        S = q.shape[2]
        kj = torch.arange(S, device=x.device)
        outs = []
        for i0 in range(0, S, self.chunk):
            qc = q[:, :, i0:i0 + self.chunk]
            visible = kj[None, :] <= torch.arange(i0, i0 + qc.shape[2], device=x.device)[:, None]
            w = self._weights(qc @ k.transpose(-1, -2) * self.head_dim ** -0.5, visible)
            outs.append(w @ v)
        return self._out(torch.cat(outs, 2))

    def reference(self, x: Tensor) -> Tensor:
        """Per-query loop, for tests."""
        q, k, v = self._heads(x)
        S = q.shape[2]
        rows = []
        for i in range(S):
            s = q[:, :, i:i + 1] @ k[:, :, :i + 1].transpose(-1, -2) * self.head_dim ** -0.5
            rows.append(self._weights(s, torch.ones(1, i + 1, dtype=torch.bool, device=x.device)) @ v[:, :, :i + 1])
        return self._out(torch.cat(rows, 2))
