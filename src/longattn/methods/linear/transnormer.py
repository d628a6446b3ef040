"""TransNormer's NormAttention (Qin et al. 2022, "The Devil in Linear Transformer"): drop the unstable
phi(q) z denominator of linear attention and normalise the output instead (per-head RMSNorm)."""

from __future__ import annotations

from torch import Tensor

from longattn.methods.linear.base import FeatureMapAttention, elu_plus_one
from longattn.methods.registry import register


@register("transnormer", "linear", paper="The Devil in Linear Transformer (Qin et al. 2022), NormAttention",
          impls=("torch",))
class TransNormerAttention(FeatureMapAttention):
    """o_t = RMSNorm(phi(q_t) S_t), phi = elu + 1, optional per-head decay (None: plain cumulative sum)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, *,
                 decay: Tensor | list[float] | None = None, chunk: int = 64):
        super().__init__(d_model, n_heads, head_dim, decay=decay, normalize=False, output_norm=True, chunk=chunk)

    def feature_map(self, x: Tensor) -> Tensor:
        return elu_plus_one(x)
