"""Long-convolution token mixer (H3 / Hyena order-2 style, Fu et al. 2023; Poli et al. 2023): a per-channel causal
convolution as long as the sequence, with an exponentially windowed learned kernel, gated multiplicatively,
computed by FFT. NOT a finite-state recurrence (the kernel is free, so a step needs the whole input history):
only the parallel form exists, tested against the direct convolution."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from longattn.methods.linear.kernel_rpe import causal_fft_conv
from longattn.methods.registry import register


@register("long_conv", "linear", paper="H3 (Fu et al. 2023) / Hyena (Poli et al. 2023) long convolutions",
          impls=("torch",))
class LongConv(nn.Module):
    """y = W_o (g * (h conv v) + skip * v) with [v, g] = W_in x and h_c[t] = w_c[t] * exp(-rate_c t)."""

    def __init__(self, d_model: int, *, max_len: int = 4096):
        super().__init__()
        self.d_model, self.max_len = d_model, max_len
        self.in_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.kernel = nn.Parameter(torch.randn(d_model, max_len) * max_len ** -0.5)
        self.log_rate = nn.Parameter(torch.linspace(-6, -1, d_model))
        self.skip = nn.Parameter(torch.ones(d_model))

    def cache_bytes(self, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """What decoding must keep: the convolved input of every past token."""
        return batch * seq_len * self.d_model * torch.empty((), dtype=dtype).element_size()

    def _parts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected [B, S, d_model={self.d_model}], got {tuple(x.shape)}")
        n = x.shape[1]
        if n > self.max_len:
            raise ValueError(f"x: sequence length {n} exceeds max_len={self.max_len} (the kernel's length)")
        v, g = self.in_proj(x).chunk(2, -1)
        t = torch.arange(n, device=x.device, dtype=x.dtype)
        h = self.kernel[:, :n].to(x.dtype) * torch.exp(-self.log_rate.exp().to(x.dtype)[:, None] * t)
        return v, g, h

    def forward(self, x: Tensor) -> Tensor:
        """FFT form: O(S log S)."""
        v, g, h = self._parts(x)
        conv = causal_fft_conv(h, v.transpose(1, 2)[..., None])[..., 0].transpose(1, 2)  # channels as 'heads'
        return self.o_proj(g * (conv + self.skip.to(x.dtype) * v))

    def reference(self, x: Tensor) -> Tensor:
        """Direct causal convolution (Toeplitz matrix), for tests."""
        v, g, h = self._parts(x)
        S = x.shape[1]
        i = torch.arange(S, device=x.device)
        off = i[:, None] - i[None, :]
        T = torch.where(off >= 0, h[:, off.clamp(min=0)], 0)  # [C, S, S]
        conv = torch.einsum("cij,bjc->bic", T, v)
        return self.o_proj(g * (conv + self.skip.to(x.dtype) * v))
