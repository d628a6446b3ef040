"""Sliding-window softmax attention as a fixed-state recurrent layer: the state is the last window - 1 keys and
values (plus which of them are real), so it plugs into the same LinearLayer interface (Based uses it, MQAR too)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longattn.methods.linear.base import LinearLayer, State


class WindowAttention(LinearLayer):
    """Causal softmax attention over the last ``window`` tokens (the query's own included)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, *, window: int = 64):
        super().__init__(d_model, n_heads, head_dim)
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window: expected a positive int (tokens attended, self included), got {window!r}")
        self.window = window
        H, D = n_heads, self.head_dim
        self.qkv = nn.Linear(d_model, 3 * H * D, bias=False)
        self.o_proj = nn.Linear(H * D, d_model, bias=False)

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        W, H, D = self.window - 1, self.n_heads, self.head_dim
        return {"k": (batch, H, W, D), "v": (batch, H, W, D), "valid": (batch, W)}

    def _forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        B, S, _ = x.shape
        W = self.window - 1
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = torch.cat([state["k"], k], 2), torch.cat([state["v"], v], 2)
        valid = torch.cat([state["valid"], x.new_ones(B, S)], 1) > 0
        qi = torch.arange(S, device=x.device)[:, None] + W
        kj = torch.arange(W + S, device=x.device)[None, :]
        mask = (kj <= qi) & (kj > qi - self.window)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask & valid[:, None, None, :])
        new = {"k": k[:, :, S:], "v": v[:, :, S:], "valid": torch.cat([state["valid"], x.new_ones(B, S)], 1)[:, S:]}
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1)), new

    def _step(self, x_t: Tensor, state: State) -> tuple[Tensor, State]:
        B = x_t.shape[0]
        q, k, v = self.qkv(x_t).view(B, 3, self.n_heads, 1, self.head_dim).unbind(1)
        k, v = torch.cat([state["k"], k], 2), torch.cat([state["v"], v], 2)
        valid = torch.cat([state["valid"], x_t.new_ones(B, 1)], 1)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5
        scores = scores.masked_fill(valid[:, None, None, :] == 0, float("-inf"))
        o = scores.softmax(-1) @ v
        new = {"k": k[:, :, 1:], "v": v[:, :, 1:], "valid": valid[:, 1:]}
        return self.o_proj(o.reshape(B, -1)), new
