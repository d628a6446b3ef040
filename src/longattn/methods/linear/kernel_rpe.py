"""Kernelized attention with relative positional encoding (Luo et al. 2021, "Stable, Fast and Accurate:
Kernelized Attention with Relative Positional Encoding"): phi(q_i) sum_j c_(i-j) phi(k_j)^T v_j with
c = exp(b) a learned per-head function of the offset, computed for all positions at once by FFT (the Toeplitz
product). NOT a recurrence: a general relative kernel needs the whole history, so this layer has only the
parallel form and is tested against the naive quadratic formula."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from longattn.methods.linear.base import elu_plus_one
from longattn.methods.registry import register


def causal_fft_conv(c: Tensor, u: Tensor) -> Tensor:
    """z_i = sum_{j <= i} c_(i-j) u_j along dim 2: c [H, S], u [B, H, S, ...] (computed in at least fp32)."""
    S = u.shape[2]
    dt = torch.promote_types(u.dtype, torch.float32)
    flat = u.to(dt).flatten(3)
    n = 2 * S
    z = torch.fft.irfft(torch.fft.rfft(flat, n=n, dim=2) * torch.fft.rfft(c.to(dt), n=n, dim=-1)[None, :, :, None],
                        n=n, dim=2)[:, :, :S]
    return z.reshape(u.shape).to(u.dtype)


@register("kernel_rpe", "linear", paper="Stable, Fast and Accurate: Kernelized Attention with RPE (Luo et al. 2021)",
          impls=("torch",))
class KernelizedRPE(nn.Module):
    """Normalised linear attention (phi = elu + 1) weighted by c_(i-j) = exp(b_h[min(i - j, max_len - 1)])."""

    eps = 1e-6

    def __init__(self, d_model: int, n_heads: int, *, max_len: int = 4096):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_heads, self.head_dim, self.max_len = d_model, n_heads, d_model // n_heads, max_len
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.rpe = nn.Parameter(-0.01 * torch.arange(max_len, dtype=torch.float32).expand(n_heads, -1).clone())

    def cache_bytes(self, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """What decoding must keep: every past key and value (a free relative kernel has no finite state)."""
        return 2 * batch * seq_len * self.d_model * torch.empty((), dtype=dtype).element_size()

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        B, S, d = x.shape
        if x.dim() != 3 or d != self.d_model:
            raise ValueError(f"x: expected [B, S, d_model={self.d_model}], got {tuple(x.shape)}")
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)  # the last column carries the normaliser
        c = self.rpe[:, torch.arange(S, device=x.device).clamp(max=self.max_len - 1)].to(x.dtype).exp()
        return elu_plus_one(q), elu_plus_one(k), v, c

    def _out(self, o: Tensor) -> Tensor:
        o = o[..., :-1] / (o[..., -1:] + self.eps)
        B, H, S, D = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * D))

    def forward(self, x: Tensor) -> Tensor:
        """FFT form: O(S log S) in the sequence length."""
        q, k, v, c = self._heads(x)
        z = causal_fft_conv(c, k[..., :, None] * v[..., None, :])  # [B, H, S, F, Dv + 1]
        return self._out((q[..., None, :] @ z).squeeze(-2))

    def reference(self, x: Tensor) -> Tensor:
        """The quadratic formula, for tests: ((phi(q) phi(k)^T) * C) [v, 1] with C_ij = c_(i-j) for j <= i."""
        q, k, v, c = self._heads(x)
        S = x.shape[1]
        i = torch.arange(S, device=x.device)
        off = i[:, None] - i[None, :]
        C = torch.where(off >= 0, c[:, off.clamp(min=0)], 0)
        return self._out(((q @ k.transpose(-1, -2)) * C) @ v)
