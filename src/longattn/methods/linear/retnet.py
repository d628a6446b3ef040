"""RetNet's multi-scale retention (Sun et al. 2023): per-head decay gamma_h = 1 - 2^(-5 - h), no feature map,
per-head normalised output with a swish gate. (The xPos rotation of q and k is not applied here.)"""

from __future__ import annotations

import torch

from longattn.methods.linear.base import FeatureMapAttention
from longattn.methods.registry import register


@register("retnet", "linear", paper="Retentive Network (Sun et al. 2023)", impls=("torch",))
class Retention(FeatureMapAttention):
    """S_t = gamma_h S_{t-1} + k_t^T v_t, o_t = q_t S_t / sqrt(d); RMSNorm per head, swish-gated output."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, *, chunk: int = 64):
        gammas = 1 - 2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64))
        super().__init__(d_model, n_heads, head_dim, decay=gammas, normalize=False, output_norm=True,
                         output_gate=True, chunk=chunk)
        self.scale = self.qk_dim ** -0.5
