"""Attention patterns as FlexAttention-style mask_mod functions, composable with & | ~."""

from longattn.masks.core import MaskMod, as_mask_mod, evaluate

__all__ = ["MaskMod", "as_mask_mod", "evaluate"]
