"""Record each layer's post-RoPE queries and keys from one forward of a transformers model (calibration data for
the MInference pattern search and the SeerAttention gate distillation); attention itself runs dense."""

from __future__ import annotations

import torch
from torch import Tensor

from longattn import masks
from longattn.masks.block_sparse import BlockSparse
from longattn.methods.prefill.base import PrefillMethod


class _Recorder(PrefillMethod):
    """A prefill 'method' that keeps (layer, q, k) and returns plain causal blocks, so the forward stays dense."""

    def __init__(self):
        self.samples: list[tuple[int, Tensor, Tensor]] = []

    def estimate(self, q: Tensor, k: Tensor, *, layer: int = 0) -> BlockSparse:
        self.samples.append((layer, q.detach().clone(), k.detach().clone()))
        Sq, Skv = q.shape[2], k.shape[2]
        return BlockSparse.from_mask_mod(masks.causal(offset=Skv - Sq), 1, 1, Sq, Skv, 64, device=q.device)


def capture_qk(model, input_ids: Tensor) -> list[tuple[int, Tensor, Tensor]]:
    """(layer, q [B, Hq, S, D], k [B, Hkv, S, D]) for every attention layer of ``model`` on ``input_ids``."""
    from longattn.hf.patch import patch

    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise TypeError(f"input_ids: expected a 2-D token id tensor [B, S], got {type(input_ids).__name__} "
                        f"{tuple(getattr(input_ids, 'shape', ()))}")
    recorder = _Recorder()
    handle = patch(model, impl="reference")
    handle.state.method = recorder
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        handle.restore()
    return recorder.samples
