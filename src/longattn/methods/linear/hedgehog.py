"""Hedgehog (Zhang et al. 2024, "The Hedgehog & the Porcupine"): linear attention whose feature map is a small
learnable per-head projection followed by softmax(+/-), trained to mimic softmax attention weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from longattn.methods.linear.base import FeatureMapAttention
from longattn.methods.registry import register


@register("hedgehog", "linear", paper="The Hedgehog & the Porcupine (Zhang et al. 2024)", impls=("torch",))
class Hedgehog(FeatureMapAttention):
    """phi(x) = [softmax(x W_h), softmax(-x W_h)] with W_h [D, m] per head (identity-initialised when m == D);
    feature size 2m. ``distillation_loss`` trains phi against the layer's own softmax attention."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, *, feature_dim: int | None = None,
                 chunk: int = 64):
        super().__init__(d_model, n_heads, head_dim, normalize=True, chunk=chunk)
        m = feature_dim or self.qk_dim
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"feature_dim: expected a positive int (projection size m; features are 2m), got {m!r}")
        self.feature_dim = 2 * m
        init = torch.eye(self.qk_dim, m) if m == self.qk_dim else torch.randn(self.qk_dim, m) * self.qk_dim ** -0.5
        self.fmap = nn.Parameter(init.expand(n_heads, -1, -1).clone())

    def feature_map(self, x: Tensor) -> Tensor:
        z = torch.einsum("bhsd,hdm->bhsm", x, self.fmap.to(x.dtype))
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], -1)

    def distillation_loss(self, x: Tensor) -> Tensor:
        """Cross-entropy between the causal softmax attention weights of this layer's q, k (the teacher, no
        gradient) and the normalised weights phi(q) phi(k)^T (the student): Hedgehog's training signal."""
        self._check_x(x, 3, "x")
        B, S, _ = x.shape
        q, k = (p(x).view(B, S, self.n_heads, self.qk_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj))
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        with torch.no_grad():
            teacher = (q @ k.transpose(-1, -2) * self.qk_dim ** -0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        scores = (self.feature_map(q) @ self.feature_map(k).transpose(-1, -2)).masked_fill(~causal, 0)
        student = scores / scores.sum(-1, keepdim=True)
        return -(teacher * torch.log(student.clamp_min(1e-12))).sum(-1).mean()
