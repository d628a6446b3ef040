"""``longattn.attention``: one entry point for exact, masked and block-sparse attention.

Validates once at the boundary, turns any mask kind into what the chosen backend consumes, and dispatches:
"sdpa" (PyTorch SDPA: cuDNN / flash on GPU) for dense and causal; "triton" (our block-sparse kernels) for
masks, bias, LSE and packed batches on GPU; "flex" (torch FlexAttention); "gather" (vectorised PyTorch over the
retained blocks only: the CPU path for masks); "reference" (the chunked oracle). "auto" picks the fastest
eligible backend and logs the choice once; it never falls back silently: an explicit impl that cannot run raises.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from longattn.kernels.block_sparse import INTERPRET, BlockSparseAttention, pad_rank
from longattn.kernels.gather import block_gather_attention
from longattn.kernels.reference import reference_attention
from longattn.masks import varlen
from longattn.masks.block_sparse import BlockSparse, check_cu_seqlens
from longattn.masks.core import MaskMod, as_mask_mod

log = logging.getLogger("longattn")
IMPLS = ("auto", "triton", "flex", "sdpa", "gather", "reference")
TRITON_HEAD_DIMS = (16, 32, 64, 128)
_logged: set[str] = set()
_block_cache: OrderedDict[tuple, tuple[object, BlockSparse]] = OrderedDict()
_BLOCK_CACHE_SIZE = 32


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask=None,
    causal: bool = False,
    scale: float | None = None,
    impl: str = "auto",
    return_lse: bool = False,
    bias: tuple[Tensor, Tensor] | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_kv: Tensor | None = None,
    block: tuple[int, int] = (128, 128),
):
    """Attention over ``(batch, heads, seq, head_dim)`` tensors; GQA when q heads are a multiple of kv heads.

    mask: None, a mask_mod ``(b, h, q_idx, kv_idx) -> bool``, a ``BlockSparse`` or a FlexAttention ``BlockMask``.
    causal: bottom-right aligned when seq_q != seq_kv (chunked prefill, decoding).
    bias: low-rank additive bias factors ``(U [B, Hq, Sq, r], W [B, Hq, Skv, r])``: scores += U @ W.T.
    cu_seqlens_q / cu_seqlens_kv: packed variable-length batch (B = 1); masks see b = sequence index and
    sequence-local positions. block: (query, kv) block size used when a mask_mod becomes a BlockSparse.
    Returns out, or (out, lse) with lse float32 [B, Hq, Sq] (natural log; -inf for rows with nothing to attend).
    """
    _validate(q, k, v, mask, causal, impl, bias, cu_seqlens_q, cu_seqlens_kv)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if cu_seqlens_q is not None or cu_seqlens_kv is not None:
        cu_seqlens_q = cu_seqlens_kv if cu_seqlens_q is None else cu_seqlens_q
        cu_seqlens_kv = cu_seqlens_q if cu_seqlens_kv is None else cu_seqlens_kv
    chosen = _choose(q, mask, impl, return_lse, bias, cu_seqlens_q)
    if chosen == "sdpa":
        return _sdpa(q, k, v, causal, scale)
    if chosen == "triton":
        bs = _to_block_sparse(mask, causal, q, k, block, cu_seqlens_q, cu_seqlens_kv)
        u, w = pad_rank(*bias) if bias is not None else (None, None)
        out, lse = BlockSparseAttention.apply(q, k, v, u, w, bs, scale)
    elif chosen == "gather":
        bs = _to_block_sparse(mask, causal, q, k, block, None, None)
        out, lse = block_gather_attention(q, k, v, bs, scale, return_lse=return_lse)
    elif chosen == "flex":
        out, lse = _flex(q, k, v, mask, causal, scale, bias, cu_seqlens_q, cu_seqlens_kv, block)
    else:
        ref_mask = mask if mask is None or isinstance(mask, BlockSparse) else _from_flex_or_mod(mask)
        out, lse = reference_attention(q, k, v, mask=ref_mask, causal=causal, scale=scale, bias=bias,
                                       cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv)
    return (out, lse) if return_lse else out


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_sparse: BlockSparse, **kwargs):
    """Block-sparse attention with a prebuilt ``BlockSparse`` (the form dynamic methods produce)."""
    if not isinstance(block_sparse, BlockSparse):
        raise TypeError(f"block_sparse: expected a longattn.BlockSparse, got {type(block_sparse).__name__}")
    return attention(q, k, v, mask=block_sparse, **kwargs)


# ---------------------------------------------------------------------------------------------- dispatch
def _triton_ok(q: Tensor) -> str | None:
    """None if the Triton kernels can run on q, else the reason."""
    if q.device.type != "cuda" and not INTERPRET:
        return f"needs a CUDA device (got {q.device}); set TRITON_INTERPRET=1 to run it interpreted on CPU"
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        return f"supports head_dim in {TRITON_HEAD_DIMS}, got {q.shape[-1]}"
    allowed = (torch.float16, torch.bfloat16) + ((torch.float32,) if INTERPRET else ())
    if q.dtype not in allowed:
        return f"supports dtypes {allowed}, got {q.dtype}"
    return None


def _choose(q, mask, impl, return_lse, bias, cu) -> str:
    if impl != "auto":
        if impl == "triton" and (why := _triton_ok(q)):
            raise ValueError(f"impl='triton': the Triton kernel {why}")
        if impl == "sdpa" and (mask is not None or return_lse or bias is not None or cu is not None):
            raise ValueError("impl='sdpa': SDPA runs dense or causal attention only; it takes no mask, bias, "
                             "cu_seqlens or return_lse (use impl='triton', 'flex' or 'reference')")
        if impl == "gather" and (bias is not None or cu is not None):
            raise ValueError("impl='gather': the gather path takes no bias or cu_seqlens (use 'triton' or "
                             "'reference')")
        return impl
    dense = mask is None and bias is None and cu is None
    if dense and not return_lse:
        chosen, why = "sdpa", "dense/causal attention"
    elif q.device.type == "cuda" and _triton_ok(q) is None:
        chosen, why = "triton", "masked/biased/varlen attention or LSE requested"
    elif mask is not None and bias is None and cu is None:
        chosen = "gather"
        why = ("masked attention on CPU: only the retained blocks are computed" if q.device.type == "cpu" else
               f"the Triton kernel cannot take this call ({_triton_ok(q)}): using the PyTorch block-gather path")
    else:
        chosen = "reference"
        why = f"no fast kernel for this call on {q.device} ({_triton_ok(q) or 'CPU'}): using the chunked reference"
    key = f"{chosen}|{why}"
    if key not in _logged:
        _logged.add(key)
        log.info("longattn.attention impl='auto' chose %r: %s", chosen, why)
        if chosen in ("gather", "reference") and q.device.type == "cuda":  # a slow path on a GPU is never silent
            warnings.warn(f"longattn.attention: {why}", RuntimeWarning, stacklevel=3)
    return chosen


def _sdpa(q, k, v, causal, scale):
    Sq, Skv = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if causal and Sq == 1:  # one query row aligned bottom-right sees every key: no mask (and no GQA copies)
        causal = False
    if causal and Sq != Skv:
        from torch.nn.attention.bias import causal_lower_right

        if gqa:  # the lower-right bias object does not take enable_gqa on every torch version
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Sq, Skv), scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)


# ---------------------------------------------------------------------------------------------- masks
def _is_flex_block_mask(mask) -> bool:
    return type(mask).__name__ == "BlockMask" and hasattr(mask, "kv_num_blocks")


def _from_flex_or_mod(mask):
    return BlockSparse.from_flex(mask) if _is_flex_block_mask(mask) else as_mask_mod(mask)


def _with_causal(mask, causal: bool, Sq: int, Skv: int) -> MaskMod | None:
    if not causal:
        return None if mask is None else as_mask_mod(mask)
    from longattn.masks.patterns import causal as causal_mask

    c = causal_mask(offset=Skv - Sq)
    return c if mask is None else as_mask_mod(mask) & c


def _to_block_sparse(mask, causal, q, k, block, cu_q, cu_kv) -> BlockSparse:
    """The BlockSparse a Triton call runs on, built once per (mask, shape, device) and cached."""
    if isinstance(mask, BlockSparse):
        return mask if mask.device == q.device else mask.to(q.device)
    B, H, Sq, _ = q.shape
    Skv = k.shape[2]
    key = (id(mask), causal, B, H, Sq, Skv, tuple(block), str(q.device),
           None if cu_q is None else tuple(cu_q.tolist()), None if cu_kv is None else tuple(cu_kv.tolist()))
    hit = _block_cache.get(key)
    if hit is not None and hit[0] is mask:
        _block_cache.move_to_end(key)
        return hit[1]
    if _is_flex_block_mask(mask):
        bs = BlockSparse.from_flex(mask).to(q.device)
    elif cu_q is not None:
        m = varlen.causal_per_sequence(cu_q, cu_kv) if causal else None
        if mask is not None:
            m = as_mask_mod(mask) if m is None else as_mask_mod(mask) & m
        m = m if m is not None else as_mask_mod(lambda b, h, qi, kv: qi >= 0)
        bs = BlockSparse.from_mask_mod(m, 1, H, Sq, Skv, block, device=q.device, cu_seqlens_q=cu_q,
                                       cu_seqlens_kv=cu_kv)
    else:
        from longattn.masks.patterns import full

        m = _with_causal(mask, causal, Sq, Skv) or full()
        bs = BlockSparse.from_mask_mod(m, B, H, Sq, Skv, block, device=q.device)
    _block_cache[key] = (mask, bs)
    if len(_block_cache) > _BLOCK_CACHE_SIZE:
        _block_cache.popitem(last=False)
    return bs


@functools.cache
def _compiled_flex():
    """FlexAttention compiled once per process (it is slow eager and materialises the mask)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, mask, causal, scale, bias, cu_q, cu_kv, block):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, Sq, _ = q.shape
    Skv = k.shape[2]
    if isinstance(mask, BlockSparse):
        if causal:
            raise ValueError("causal: encode causality in the BlockSparse itself when passing one")
        block_mask = mask.to_flex()
    elif _is_flex_block_mask(mask):
        if causal:
            raise ValueError("causal: encode causality in the BlockMask itself when passing one")
        block_mask = mask
    else:
        if cu_q is not None:
            m = varlen.packed(cu_q, cu_kv, causal=causal, inner=mask)
        else:
            m = _with_causal(mask, causal, Sq, Skv)
        block_mask = None if m is None else create_block_mask(m, None, None, Sq, Skv, device=q.device,
                                                              BLOCK_SIZE=tuple(block))
    score_mod = None
    if bias is not None:
        u, w = bias

        def score_mod(score, b, h, qi, kv):
            return score + (u[b, h, qi].float() * w[b, h, kv].float()).sum()

    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    aux = _flex_lse_request()
    lse_kwarg = {"return_lse": True} if aux is None else {"return_aux": aux}
    out, extra = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                    enable_gqa=q.shape[1] != k.shape[1], **lse_kwarg)
    return out, (extra if aux is None else extra.lse)


def _flex_lse_request():
    """``AuxRequest(lse=True)`` where torch has it (``return_lse`` is deprecated there), else None."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return None
    return AuxRequest(lse=True)


# ---------------------------------------------------------------------------------------------- validation
def _validate(q, k, v, mask, causal, impl, bias, cu_q, cu_kv) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if not (t.dtype.is_floating_point):
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        if 0 in t.shape:
            raise ValueError(f"{name}: expected non-empty dims, got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} like q, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} like q, got {t.device}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} like k, got {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k: expected batch {q.shape[0]} and head_dim {q.shape[3]} like q, got shape {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k: query heads ({q.shape[1]}) must be a multiple of kv heads, got {k.shape[1]} kv heads")
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    B, H, Sq, _ = q.shape
    Skv = k.shape[2]
    if isinstance(mask, BlockSparse):
        mb, mh, msq, mskv = mask.shape
        if mb not in (1, B) or mh not in (1, H) or (msq, mskv) != (Sq, Skv):
            raise ValueError(f"mask: BlockSparse of shape (B={mb}, H={mh}, seq_q={msq}, seq_kv={mskv}) does not "
                             f"match q/k (B={B}, H={H}, seq_q={Sq}, seq_kv={Skv}); B and H may also be 1")
        if causal:
            raise ValueError("causal: encode causality in the BlockSparse itself when passing one")
    elif _is_flex_block_mask(mask):
        msq, mskv = mask.seq_lengths
        if (msq, mskv) != (Sq, Skv):
            raise ValueError(f"mask: BlockMask for seq ({msq}, {mskv}) does not match q/k seq ({Sq}, {Skv})")
        if causal:
            raise ValueError("causal: encode causality in the BlockMask itself when passing one")
    elif mask is not None and not callable(mask):
        raise TypeError(f"mask: expected None, a mask_mod callable, a BlockSparse or a BlockMask, "
                        f"got {type(mask).__name__}")
    if bias is not None:
        if not (isinstance(bias, tuple) and len(bias) == 2 and all(isinstance(t, Tensor) for t in bias)):
            raise TypeError("bias: expected a tuple (U, W) of tensors with scores += U @ W.T")
        u, w = bias
        if u.dim() != 4 or tuple(u.shape[:3]) != (B, H, Sq):
            raise ValueError(f"bias: expected U of shape ({B}, {H}, {Sq}, r), got {tuple(u.shape)}")
        if w.dim() != 4 or tuple(w.shape) != (B, H, Skv, u.shape[3]):
            raise ValueError(f"bias: expected W of shape ({B}, {H}, {Skv}, {u.shape[3]}), got {tuple(w.shape)}")
        if u.dtype != q.dtype or w.dtype != q.dtype or u.device != q.device or w.device != q.device:
            raise TypeError(f"bias: expected factors with q's dtype {q.dtype} and device {q.device}")
    if cu_q is not None or cu_kv is not None:
        if B != 1:
            raise ValueError(f"q: packed variable-length batches (cu_seqlens) need batch 1, got {B}")
        check_cu_seqlens("cu_seqlens_q", cu_q if cu_q is not None else cu_kv, Sq)
        check_cu_seqlens("cu_seqlens_kv", cu_kv if cu_kv is not None else cu_q, Skv)
        if isinstance(mask, BlockSparse) or _is_flex_block_mask(mask):
            raise ValueError("mask: with cu_seqlens pass a mask_mod (evaluated per sequence), not a block mask")
