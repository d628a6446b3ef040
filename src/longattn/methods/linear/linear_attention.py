"""Linear attention with the elu+1 feature map (Katharopoulos et al. 2020, "Transformers are RNNs")."""

from __future__ import annotations

from torch import Tensor

from longattn.methods.linear.base import FeatureMapAttention, elu_plus_one
from longattn.methods.registry import register


@register("linear_elu", "linear", paper="Transformers are RNNs (Katharopoulos et al. 2020)", impls=("torch",))
class LinearAttention(FeatureMapAttention):
    """phi(q) S / phi(q) z with phi = elu + 1; state: S [B, H, D, D + 1] (the last column is z = sum phi(k))."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, *, chunk: int = 64):
        super().__init__(d_model, n_heads, head_dim, normalize=True, chunk=chunk)

    def feature_map(self, x: Tensor) -> Tensor:
        return elu_plus_one(x)
