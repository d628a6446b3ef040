"""Validation of ``decode_attention`` inputs at the public boundary: shapes, dtypes, devices, pages, selections.

Value checks (lengths within the cache, page numbers within range) are computed on the device and read back with
one synchronisation; they are skipped while a CUDA graph is being captured (the usual way a decode step runs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

INT_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _int_tensor(name: str, t: Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: got {type(t).__name__}, expected a torch.Tensor")
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name}: got dtype {t.dtype}, expected int32 or int64")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: got shape {tuple(t.shape)}, expected {shape}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected the device of q ({device})")


class _ValueChecks:
    """Value checks gathered on the device and read back with one synchronisation (none while capturing)."""

    def __init__(self, device: torch.device) -> None:
        self.active = not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
        self.items: list[tuple[Tensor, Callable[[], str]]] = []

    def in_range(self, name: str, t: Tensor, lo: int, hi: int, what: str, used: Tensor | None = None) -> None:
        """Every value of t (where ``used``) must lie in [lo, hi]."""
        if not self.active or not t.numel():
            return
        bad = (t < lo) | (t > hi)

        def message() -> str:  # evaluated only after a failure (boolean indexing synchronises)
            vals = t if used is None else t[used]
            return f"{name}: values must lie in [{lo}, {hi}] ({what}); got min {int(vals.min())}, max {int(vals.max())}"

        self.items.append((bad if used is None else bad & used, message))

    def distinct(self, name: str, t: Tensor, used: Tensor) -> None:
        """The used entries of each row of t (last dim) are pairwise different."""
        if not self.active or t.shape[-1] < 2:
            return
        fill = -1 - torch.arange(t.shape[-1], device=t.device)  # distinct negatives for the unused slots
        s = torch.where(used, t.long(), fill).sort(-1).values
        self.items.append(((s[..., 1:] == s[..., :-1]), lambda: (
            f"{name}: a page is listed twice among the first page_counts entries of one (batch, kv head); "
            "expected distinct pages")))

    def run(self) -> None:
        if not self.items:
            return
        flags = torch.stack([bad.any() for bad, _ in self.items]).tolist()
        for (_, message), failed in zip(self.items, flags, strict=True):
            if failed:
                raise ValueError(message())


def check_page_size(page_size: object) -> int:
    """A positive power of two, so that pages and the kernel's tiles divide one another."""
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise TypeError(f"page_size: got {type(page_size).__name__}, expected an int")
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page_size: got {page_size}; expected a positive power of two (pages and kernel tiles "
                         "must divide one another)")
    return page_size


def check_decode_inputs(q, k_cache, v_cache, cache_seqlens, block_table, page_size, page_indices,
                        page_counts) -> tuple[Tensor | None, int | None]:
    """Raise on bad input; return (lengths int32 [B] or [B, Hkv], None where the caches are full; page size or
    None)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: got {type(t).__name__}, expected a torch.Tensor")
        if t.dim() != 4:
            raise ValueError(f"{name}: got shape {tuple(t.shape)}, expected 4 dimensions")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: got dtype {t.dtype}, expected a floating dtype")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, expected the device of q ({q.device})")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"k_cache/v_cache: dtypes {k_cache.dtype}/{v_cache.dtype}, expected q's dtype {q.dtype}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache: got shape {tuple(v_cache.shape)}, expected k_cache's {tuple(k_cache.shape)}")
    B, Hq, Tq, D = q.shape
    Hkv = k_cache.shape[1]
    if Tq < 1:
        raise ValueError(f"q: got {Tq} query tokens (dim 2), expected at least 1")
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache: head_dim {k_cache.shape[3]}, expected q's head_dim {D}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q: {Hq} heads is not a multiple of the cache's {Hkv} kv heads (GQA)")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k_cache/v_cache: the last dimension (head_dim) must be contiguous")

    checks = _ValueChecks(q.device)
    if block_table is not None:
        ps = k_cache.shape[2]
        if page_size is not None and page_size != ps:
            raise ValueError(f"page_size: got {page_size}, but the paged cache holds pages of {ps} tokens "
                             "(k_cache.shape[2])")
        page_size = check_page_size(ps)
        if block_table.dim() != 2:
            raise ValueError(f"block_table: got shape {tuple(block_table.shape)}, expected [B={B}, max_pages]")
        _int_tensor("block_table", block_table, (B, block_table.shape[1]), q.device)
        checks.in_range("block_table", block_table, 0, k_cache.shape[0] - 1, "physical page numbers")
        capacity = block_table.shape[1] * ps
    else:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache: batch {k_cache.shape[0]}, expected q's batch {B} (a paged cache needs "
                             "block_table)")
        if page_size is not None:
            page_size = check_page_size(page_size)
        capacity = k_cache.shape[2]

    lengths = None  # every sequence fills the cache's capacity
    if cache_seqlens is not None:
        shape = tuple(getattr(cache_seqlens, "shape", ()))
        if isinstance(cache_seqlens, Tensor) and shape not in ((B,), (B, Hkv)):
            raise ValueError(f"cache_seqlens: got shape {shape}, expected {(B,)} (per sequence) or {(B, Hkv)} (per "
                             "sequence and kv head)")
        _int_tensor("cache_seqlens", cache_seqlens, shape, q.device)
        checks.in_range("cache_seqlens", cache_seqlens, 0, capacity, "tokens the cache can hold")
        lengths = cache_seqlens.to(torch.int32).contiguous()

    if (page_indices is None) != (page_counts is None):
        raise ValueError("page_indices/page_counts: give both (a selection) or neither")
    if page_indices is not None:
        if page_size is None:
            raise ValueError("page_size: required with page_indices on a contiguous cache (pages of page_size "
                             "tokens)")
        if page_indices.dim() != 3 or page_indices.shape[1] not in (Hkv, Hq):
            raise ValueError(f"page_indices: got shape {tuple(page_indices.shape)}, expected [B={B}, Hkv={Hkv}, "
                             f"n_sel] (one set per kv head) or [B={B}, Hq={Hq}, n_sel] (one per query head)")
        heads, n_sel = page_indices.shape[1:]
        _int_tensor("page_indices", page_indices, (B, heads, n_sel), q.device)
        _int_tensor("page_counts", page_counts, (B, heads), q.device)
        n_pages = -(-capacity // page_size)
        checks.in_range("page_counts", page_counts, 0, n_sel, "entries of page_indices")
        used = None
        if checks.active:
            used = torch.arange(n_sel, device=q.device).view(1, 1, -1) < page_counts.unsqueeze(-1)  # rest: padding
        checks.in_range("page_indices", page_indices, 0, n_pages - 1, f"logical pages of {page_size} tokens", used)
        checks.distinct("page_indices", page_indices, used)
    checks.run()
    return lengths, page_size
