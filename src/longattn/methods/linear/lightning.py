"""Lightning Attention (TransNormerLLM / Lightning Attention-2, Qin et al. 2023-24): linear attention with a fixed
per-head exponential decay, SiLU features, no softmax normaliser, normalised and gated output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longattn.methods.linear.base import FeatureMapAttention
from longattn.methods.registry import register


def alibi_decays(n_heads: int) -> Tensor:
    """Per-head decay exp(-slope) with ALiBi-style geometric slopes 2^(-8 (h + 1) / H): slow and fast heads."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, n_heads + 1, dtype=torch.float64) / n_heads)
    return torch.exp(-slopes)


@register("lightning", "linear", paper="TransNormerLLM / Lightning Attention-2 (Qin et al. 2023, 2024)",
          impls=("torch",))
class LightningAttention(FeatureMapAttention):
    """S_t = lambda_h S_{t-1} + silu(k_t)^T v_t, o_t = silu(q_t) S_t, then per-head RMSNorm and a SiLU gate.
    ``decay`` overrides the default ALiBi-slope decays (one value per head in (0, 1])."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, *,
                 decay: Tensor | list[float] | None = None, chunk: int = 64):
        super().__init__(d_model, n_heads, head_dim, decay=alibi_decays(n_heads) if decay is None else decay,
                         normalize=False, output_norm=True, output_gate=True, chunk=chunk)

    def feature_map(self, x: Tensor) -> Tensor:
        return F.silu(x)
