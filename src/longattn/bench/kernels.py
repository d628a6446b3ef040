"""``longattn bench kernels``: our block-sparse kernels against cuDNN / flash SDPA and compiled FlexAttention,
per pattern × length × direction, all in one process. Each row records the correctness check made in the same
run; a row whose check fails is marked and never counted as a speed-up."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from longattn import masks
from longattn.api import attention
from longattn.bench.timing import append_jsonl, environment, median_ms, peak_memory
from longattn.kernels.block_sparse import backward_kernel, forward_kernel
from longattn.kernels.reference import reference_attention
from longattn.masks.block_sparse import BlockSparse
from longattn.masks.core import MaskMod

CHECK_HEADS = 2  # heads checked against the reference in every row (the reference is O(seq²) work)


def random_blocks_causal(seq: int, heads: int, keep: float, block: int, seed: int = 0,
                         device: torch.device | str = "cpu") -> MaskMod:
    """Causal mask whose off-diagonal blocks are kept with probability ``keep``, independently per head
    (the shape dynamic sparse-prefill methods produce); the diagonal block is always kept. The table lives on
    ``device`` and is captured directly, so torch.compile can trace the mask (FlexAttention anchor)."""
    n = math.ceil(seq / block)
    g = torch.Generator().manual_seed(seed)
    table = ((torch.rand(heads, n, n, generator=g) < keep) | torch.eye(n, dtype=torch.bool)).to(device)

    def random_blocks(b, h, q, kv):
        return table[h, q // block, kv // block] & (kv <= q)

    def bounds(b, h, q_lo, q_hi, kv_lo, kv_hi):
        sel = table[h, q_lo // block, kv_lo // block]
        return sel & (kv_lo <= q_hi), sel & (kv_hi <= q_lo)

    return MaskMod(random_blocks, bounds=bounds, name=f"random_blocks(keep={keep})")


PATTERNS: dict[str, Callable[..., MaskMod]] = {
    "causal": lambda S, H, blk, dev: masks.causal(),
    "sliding_window": lambda S, H, blk, dev: masks.sliding_window(4096),
    "sink_window": lambda S, H, blk, dev: masks.sinks(128, 4096),
    "dilated": lambda S, H, blk, dev: masks.dilated(32, 4, granularity=blk),
    "random_90": lambda S, H, blk, dev: random_blocks_causal(S, H, 0.1, blk, device=dev),
    "random_0": lambda S, H, blk, dev: random_blocks_causal(S, H, 1.0, blk, device=dev),
}


@dataclass
class Shape:
    batch: int
    heads_q: int
    heads_kv: int
    seq: int
    head_dim: int
    dtype: torch.dtype


def _flops(shape: Shape, area: float, direction: str) -> float:
    """Matmul FLOPs over ``area`` query×key pairs per head (fwd: QK and PV; bwd: 2.5× forward)."""
    fwd = 4.0 * shape.batch * shape.heads_q * area * shape.head_dim
    return fwd if direction == "fwd" else 2.5 * fwd


def _timed(direction: str, fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor], device) -> tuple[float, int]:
    if direction == "fwd":
        with torch.no_grad():
            return median_ms(fn, device), peak_memory(fn, device)
    out = fn()
    dout = torch.randn_like(out)

    def bwd():
        return torch.autograd.grad(out, inputs, dout, retain_graph=True)

    return median_ms(bwd, device), peak_memory(bwd, device)


def _checked_heads(q, k, v) -> tuple[torch.Tensor, ...]:
    """The first CHECK_HEADS query heads and the kv heads they read."""
    hq = min(CHECK_HEADS, q.shape[1])
    hk = math.ceil(hq / (q.shape[1] // k.shape[1]))
    return q[:, :hq], k[:, :hk], v[:, :hk]


def _max_err_vs_reference(q, k, v, mask, bs: BlockSparse, impl: str) -> float:
    """Max abs error of our output against the fp32 chunked reference on the first CHECK_HEADS heads."""
    qs, ks, vs = _checked_heads(q, k, v)
    with torch.no_grad():
        ours = attention(qs, ks, vs, mask=mask, impl=impl, block=bs.block_size)
        ref, _ = reference_attention(qs, ks, vs, mask=mask, compute_dtype=torch.float32)
    return float((ours.float() - ref.float()).abs().max())


def _max_grad_err_vs_reference(q, k, v, mask, bs: BlockSparse, impl: str) -> float:
    """Largest error of dq, dk, dv (first CHECK_HEADS heads, one random output gradient) against the fp32 chunked
    reference's, relative to that gradient's largest magnitude (gradients grow with the rows a key serves)."""
    qs, ks, vs = (t.detach().requires_grad_(True) for t in _checked_heads(q, k, v))
    ours = attention(qs, ks, vs, mask=mask, impl=impl, block=bs.block_size)
    dout = torch.randn_like(ours)
    got = torch.autograd.grad(ours, (qs, ks, vs), dout)
    ref_in = [t.detach().float().requires_grad_(True) for t in (qs, ks, vs)]
    ref, _ = reference_attention(*ref_in, mask=mask, compute_dtype=torch.float32)
    want = torch.autograd.grad(ref, ref_in, dout.float())
    errs = [(g.float() - w).abs().max() / w.abs().max().clamp_min(1e-30) for g, w in zip(got, want, strict=True)]
    return float(max(errs))


# What makes a row the same measurement: a rerun into the same file skips these (a new commit re-measures).
KEY_FIELDS = ("suite", "op", "pattern", "batch", "heads_q", "heads_kv", "seq_q", "head_dim", "dtype", "block",
              "anchors", "device", "torch", "triton", "git_sha")


def _finished(out: Path) -> dict[tuple, dict]:
    """Rows already in ``out`` by KEY_FIELDS (a torn last line from a killed run is skipped)."""
    from longattn.eval.report import load_rows

    if not out.exists():
        return {}
    return {tuple(r.get(k) for k in KEY_FIELDS): r for r in load_rows([out]) if r.get("suite") == "kernels"}


def run(patterns: list[str], lengths: list[int], *, directions: tuple[str, ...] = ("fwd", "bwd"),
        heads: int = 32, heads_kv: int | None = None, head_dim: int = 128, batch: int = 1,
        dtype: torch.dtype = torch.bfloat16, block: int = 128, out: Path, anchors: bool = True,
        device: str | None = None) -> list[dict]:
    """Benchmark every (pattern, length, direction); append rows to ``out`` (JSONL) and return them. Cases whose
    rows ``out`` already holds for this device, versions and commit are not re-run (their rows are returned), so a
    killed run resumes where it stopped."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = dev.type == "cuda"
    env = environment(dev)
    rows: list[dict] = []
    done = _finished(out)
    dtype_name = str(dtype).removeprefix("torch.")

    def key(name: str, S: int, direction: str) -> tuple:
        fields = {"suite": "kernels", "op": direction, "pattern": name, "batch": batch, "heads_q": heads,
                  "heads_kv": heads_kv or heads, "seq_q": S, "head_dim": head_dim, "dtype": dtype_name,
                  "block": block, "anchors": anchors, **env}
        return tuple(fields[k] for k in KEY_FIELDS)

    jobs = [(p, s) for s in lengths for p in patterns]
    sdpa_cache: dict[tuple[int, str, str], float | None] = {}
    for name, S in tqdm(jobs, desc="bench kernels", unit="case"):
        todo = [d for d in directions if key(name, S, d) not in done]
        rows.extend(done[key(name, S, d)] for d in directions if d not in todo)
        if not todo:
            continue
        shape = Shape(batch, heads, heads_kv or heads, S, head_dim, dtype)
        g = torch.Generator(device=dev).manual_seed(S)
        q = torch.randn(batch, heads, S, head_dim, device=dev, dtype=dtype, generator=g)
        k = torch.randn(batch, shape.heads_kv, S, head_dim, device=dev, dtype=dtype, generator=g)
        v = torch.randn(batch, shape.heads_kv, S, head_dim, device=dev, dtype=dtype, generator=g)
        mask = PATTERNS[name](S, heads, block, dev)
        t_build = median_ms(lambda m=mask, s=S: BlockSparse.from_mask_mod(m, batch, heads, s, s, block, device=dev),
                            dev, warmup=1, reps=3)
        bs = BlockSparse.from_mask_mod(mask, batch, heads, S, S, block, device=dev)
        density = bs.density()
        causal_area = S * (S + 1) / 2
        retained_area = density * S * S
        impl = "triton" if on_gpu else "gather"  # the fast path of each device, checked against the reference
        err = _max_err_vs_reference(q, k, v, mask, bs, impl)
        tol = 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
        for direction in todo:
            grad_err = _max_grad_err_vs_reference(q, k, v, mask, bs, impl) if direction == "bwd" else None
            correct = None if err is None else err <= tol and (grad_err is None or grad_err <= tol)
            leaves = [t.detach().requires_grad_(direction == "bwd") for t in (q, k, v)]
            ms, mem = _timed(direction, lambda lv=leaves, m=bs, i=impl: attention(*lv, mask=m, impl=i), leaves, dev)
            row = {
                "suite": "kernels", "op": direction, "pattern": name, "impl": impl, "batch": batch,
                "heads_q": heads, "heads_kv": shape.heads_kv, "seq_q": S, "seq_kv": S, "head_dim": head_dim,
                "dtype": dtype_name, "block": block, "anchors": anchors, "density": density,
                "density_vs_causal": retained_area / causal_area, "build_ms": t_build, "ms": ms,
                "tflops_actual": _flops(shape, retained_area, direction) / ms / 1e9,
                "tflops_dense_equiv": _flops(shape, causal_area, direction) / ms / 1e9,
                "peak_mem_bytes": mem, "max_abs_err": err, "max_grad_rel_err": grad_err, "correct": correct,
                "fwd_kernel": forward_kernel(q, k, v, bs) if on_gpu else None,
                "bwd_kernel": backward_kernel(q, k, v, q, bs) if on_gpu and direction == "bwd" else None, **env,
            }
            if anchors:
                row.update(_anchors(direction, shape, mask, bs, dev, sdpa_cache, on_gpu))
                cudnn = row.get("sdpa_cudnn_causal_ms")
                if cudnn:
                    row["ideal_ms"] = cudnn * row["density_vs_causal"]
                    row["frac_of_ideal"] = row["ideal_ms"] / ms if row["correct"] else None
                if row.get("flex_ms"):
                    row["speedup_vs_flex"] = row["flex_ms"] / ms if row["correct"] else None
            append_jsonl(out, row)
            rows.append(row)
        del q, k, v
        if on_gpu:
            torch.cuda.empty_cache()
    return rows


def _anchors(direction, shape: Shape, mask, bs: BlockSparse, dev, cache, on_gpu) -> dict:
    """Dense causal SDPA (cuDNN and flash backends) and FlexAttention (compiled on GPU) on the same mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(shape.batch, shape.heads_q, shape.seq, shape.head_dim, device=dev, dtype=shape.dtype)
    k = torch.randn(shape.batch, shape.heads_kv, shape.seq, shape.head_dim, device=dev, dtype=shape.dtype)
    v = torch.randn_like(k)
    leaves = [t.requires_grad_(direction == "bwd") for t in (q, k, v)]
    gqa = shape.heads_q != shape.heads_kv
    res: dict[str, float | None] = {}
    backends = {"sdpa_cudnn_causal_ms": SDPBackend.CUDNN_ATTENTION, "sdpa_flash_causal_ms": SDPBackend.FLASH_ATTENTION}
    if not on_gpu:
        backends = {"sdpa_math_causal_ms": SDPBackend.MATH}
    for key, backend in backends.items():
        ck = (shape.seq, direction, key)
        if ck not in cache:
            def sdpa(backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=gqa)
            try:
                cache[ck] = _timed(direction, sdpa, leaves, dev)[0]
            except RuntimeError as e:  # backend unavailable for this shape/device: recorded, not hidden
                cache[ck] = None
                res[key.replace("_ms", "_error")] = str(e).splitlines()[0][:200]
        res[key] = cache[ck]
    if on_gpu:
        # Each mask closure is a new graph; without a reset dynamo hits its recompile limit and flex silently
        # runs eagerly, materialising the whole mask.
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False)
        block_mask = bs.to_flex()
        try:
            res["flex_ms"] = _timed(direction, lambda: flex(*leaves, block_mask=block_mask, enable_gqa=gqa),
                                    leaves, dev)[0]
        except (RuntimeError, torch.OutOfMemoryError) as e:  # recorded in the row, never silently dropped
            res["flex_ms"], res["flex_error"] = None, str(e).splitlines()[0][:200]
            torch.cuda.empty_cache()
    return res
