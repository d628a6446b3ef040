"""The cached read on the Triton decode kernel: one query token per sequence against each kv head's kept slots.

A ``LongattnLayer`` keeps, per (batch, kv head), its tokens in a prefix of ``lengths`` slots; for a single query
token every kept slot lies in its past, so the read is exactly the decode kernel over a contiguous cache with one
length per (batch, kv head): no float32 copy of the cache, no [cap]-wide masks, no host wait. Reads the kernel does
not express (several query tokens, per-slot selections, padding masks, a model sliding window shorter than the
context, a logit bias) run the torch path in ``cache.py``; on CUDA that is announced once per reason.
``LONGATTN_KERNEL_READ=0`` keeps every read on torch (for A/B measurements).
"""

from __future__ import annotations

import os
import warnings

from torch import Tensor

from longattn.kernels.decode import MAX_HEAD_SET_GROUP, decode_triton

# devices whose cached reads run the kernel (tests add "cpu" under TRITON_INTERPRET=1)
KERNEL_DEVICES = set() if os.environ.get("LONGATTN_KERNEL_READ", "1") == "0" else {"cuda"}
_warned: set[str] = set()


def kernel_unfit(q: Tensor, layer, selection, attention_mask: Tensor | None,
                 sliding_window: int | None) -> str | None:
    """Why this read cannot run the decode kernel (None: it can). Host-known facts only: never waits on the GPU.
    ``selection``: None, bool slots, or a ``PageSelection`` (duck-typed: this module sits below ``cache.py``)."""
    D = q.shape[-1]
    if q.shape[2] != 1:
        return f"{q.shape[2]} query tokens (the kernel path reads for one)"
    if isinstance(selection, Tensor):
        return "a per-slot selection"
    if selection is not None:
        ps = selection.page_size
        group = selection.indices.shape[1] // layer.lengths.shape[1]
        if group > MAX_HEAD_SET_GROUP:
            return f"one page set per query head with {group} query heads per kv head (the kernel takes up to " \
                   f"{MAX_HEAD_SET_GROUP})"
        if ps & (ps - 1):
            return f"pages of {ps} tokens (the kernel takes powers of two)"
    if attention_mask is not None:
        return "an explicit attention mask (padding)"
    if getattr(layer, "unfolded", False):
        return "a multi-token chunk behind the window ring"
    if sliding_window and layer.seen > sliding_window:
        return "the model's sliding window is shorter than the context"
    if "logit_bias" in layer.slot_state:
        return "a per-slot logit bias"
    if D & (D - 1) or not 16 <= D <= 256:
        return f"head_dim {D} (the kernel takes powers of two from 16 to 256)"
    return None


def use_kernel(q: Tensor, layer, selection, attention_mask: Tensor | None,
               sliding_window: int | None) -> bool:
    """True when the read runs the kernel; on a kernel device, a read that cannot is announced once per reason."""
    if q.device.type not in KERNEL_DEVICES:
        return False
    reason = kernel_unfit(q, layer, selection, attention_mask, sliding_window)
    if reason is not None and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"longattn cached read: {reason}; this read runs in torch (float32 over every kept slot), "
                      "not the decode kernel", RuntimeWarning, stacklevel=3)
    return reason is None


def kernel_read(q: Tensor, layer, scale: float | None, selection=None) -> Tensor:
    """out [B, Hq, 1, D]: q's attention over each kv head's ``lengths`` kept slots (``layer.kv()`` storage), or
    over the selected pages of them (a ``PageSelection`` per kv head, or per query head: the group's union is read
    once)."""
    keys, values = layer.kv()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if selection is None:
        return decode_triton(q, keys, values, layer.lengths, None, None, None, None, scale)[0]
    return decode_triton(q, keys, values, layer.lengths, None, selection.page_size, selection.indices,
                         selection.counts, scale)[0]
