"""Informer's ProbSparse self-attention (Zhou et al. 2021), causal: only the u = factor * ceil(ln S) queries with
the largest sparsity score M(q) = max_j s_qj - mean_j s_qj (j <= q) attend; every other query outputs the running
mean of the values. NOT a recurrence (which queries are active depends on the whole sequence): parallel form only,
tested against a per-query loop. M is exact here by default; ``sample`` estimates it from that many random keys
per query, as the paper does to stay sub-quadratic."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longattn.methods.registry import register


@register("probsparse", "linear", paper="Informer (Zhou et al. 2021), ProbSparse attention", impls=("torch",))
class ProbSparseAttention(nn.Module):
    """Top-u queries by sparsity score get causal softmax attention; the lazy ones the cumulative mean of v."""

    def __init__(self, d_model: int, n_heads: int, *, factor: int = 5, sample: int | None = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor: expected a positive int (active queries = factor * ceil(ln S)), got {factor!r}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.factor, self.sample = factor, sample
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

    def active(self, q: Tensor, k: Tensor) -> Tensor:
        """Indices [B, H, u] of the active queries (largest max - mean of their causal scores)."""
        S = q.shape[2]
        u = min(S, self.factor * math.ceil(math.log(max(S, 2))))
        with torch.no_grad():
            i = torch.arange(S, device=q.device)
            if self.sample is None:
                s = q @ k.transpose(-1, -2) * self.head_dim ** -0.5
                causal = i[None, :] <= i[:, None]
                m = s.masked_fill(~causal, float("-inf")).amax(-1) - s.masked_fill(~causal, 0).sum(-1) / (i + 1)
            else:  # keys drawn uniformly from each query's past
                j = (torch.rand(S, self.sample, device=q.device) * (i[:, None] + 1)).long()
                s = torch.einsum("bhsd,bhsnd->bhsn", q, k[:, :, j]) * self.head_dim ** -0.5
                m = s.amax(-1) - s.mean(-1)
        return m.topk(u, -1).indices

    def _out(self, o: Tensor) -> Tensor:
        B, H, S, D = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * D))

    def forward(self, x: Tensor) -> Tensor:
        """Vectorised: attention only for the gathered active queries, scattered over the running mean."""
        q, k, v = self._heads(x)
        S = q.shape[2]
        idx = self.active(q, k)
        o = v.cumsum(2) / torch.arange(1, S + 1, device=x.device, dtype=x.dtype)[:, None]
        qa = q.gather(2, idx[..., None].expand(-1, -1, -1, self.head_dim))
        mask = torch.arange(S, device=x.device) <= idx[..., None]  # [B, H, u, S]
        oa = F.scaled_dot_product_attention(qa, k, v, attn_mask=mask)
        return self._out(o.scatter(2, idx[..., None].expand(-1, -1, -1, self.head_dim), oa))

    def reference(self, x: Tensor) -> Tensor:
        """Per-query loop, for tests."""
        q, k, v = self._heads(x)
        B, H, S, D = q.shape
        idx = self.active(q, k)
        rows = []
        for b in range(B):
            for h in range(H):
                act = set(idx[b, h].tolist())
                for i in range(S):
                    if i in act:
                        w = (q[b, h, i] @ k[b, h, :i + 1].T * D ** -0.5).softmax(-1)
                        rows.append(w @ v[b, h, :i + 1])
                    else:
                        rows.append(v[b, h, :i + 1].mean(0))
        return self._out(torch.stack(rows).view(B, H, S, D))
