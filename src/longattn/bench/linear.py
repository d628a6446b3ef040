"""``longattn bench linear``: causal linear attention throughput at constant tokens (batch × length fixed) from 4k
to 1M, forward and forward+backward, against fla-core's chunk kernels and cuDNN causal softmax attention in the same
process; decode step latency from a state. Every row carries the correctness check made in the same run, and a row
whose check fails reports no speed-up."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from longattn.bench.timing import append_jsonl, environment, median_ms, peak_memory
from longattn.kernels.linear import linear_attention, linear_attention_step

CHECK_TOKENS = 16384  # forward check: the first sequence's first heads up to this many tokens (prefix is exact)
REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _inputs(batch, heads, seq, dim, dtype, dev, grad: bool):
    g = torch.Generator(device=dev).manual_seed(seq)
    q, k, v = (torch.randn(batch, heads, seq, dim, device=dev, dtype=dtype, generator=g) for _ in range(3))
    k = k * dim ** -0.5  # keeps the state O(1) per token
    return [t.detach().requires_grad_(grad) for t in (q, k, v)]


def _time(direction: str, fn: Callable[[], torch.Tensor], leaves, dev) -> tuple[float, int | None]:
    """Median ms of the forward alone, or of forward + backward (a whole training step of the op)."""
    if direction == "fwd":
        with torch.no_grad():
            return median_ms(fn, dev), peak_memory(fn, dev)
    do = torch.randn_like(fn())

    def step():
        torch.autograd.grad(fn(), leaves, do)

    return median_ms(step, dev), peak_memory(step, dev)


def _fla():
    """fla-core's chunk kernels when the package imports; None (noted in the rows) otherwise."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # noqa: BLE001 - any import failure means "no anchor", recorded in the row
        return None, f"fla-core not importable: {type(e).__name__}: {str(e)[:120]}"
    return chunk_simple_gla, None


def _check(q, k, v, decay, dtype) -> dict:
    """The timed forward (same plan) on its first row's first heads and tokens, and gradients on a small problem,
    against the fp32 PyTorch chunk form."""
    L = min(q.shape[2], CHECK_TOKENS)
    qs, ks, vs = (t[:1, :2, :L].detach() for t in (q, k, v))
    d2 = None if decay is None else decay[:2]
    with torch.no_grad():
        ours = linear_attention(q, k, v, decay=decay, impl="triton")[0][:1, :2, :L]
        ref, _ = linear_attention(qs.float(), ks.float(), vs.float(), decay=d2, impl="chunk")
    fwd_err = _rel_err(ours, ref)
    leaves = [t[:1, :2, :2048].detach().clone().requires_grad_() for t in (q, k, v)]
    do = torch.randn_like(leaves[2])
    g_ours = torch.autograd.grad(linear_attention(*leaves, decay=d2, impl="triton")[0], leaves, do)
    f32 = [t.detach().float().requires_grad_() for t in leaves]
    g_ref = torch.autograd.grad(linear_attention(*f32, decay=d2, impl="chunk")[0], f32, do.float())
    bwd_err = max(_rel_err(a, b) for a, b in zip(g_ours, g_ref, strict=True))
    tol = REL_TOL[dtype]
    return {"fwd_rel_err": fwd_err, "bwd_rel_err": bwd_err, "correct": fwd_err <= tol and bwd_err <= 2 * tol}


def run(lengths: list[int], *, tokens: int = 1 << 20, heads: int = 16, head_dim: int = 128,
        dtype: torch.dtype = torch.bfloat16, modes: tuple[str, ...] = ("decay", "none"),
        directions: tuple[str, ...] = ("fwd", "fwdbwd"), sdpa_max_seq: int = 262144, anchors: bool = True,
        decode_batches: tuple[int, ...] = (1, 64), out: Path, device: str | None = None) -> list[dict]:
    """Rows per (mode, length, direction) at batch = tokens // length, plus decode-step rows; appended to ``out``."""
    dev = torch.device(device or "cuda")
    env = environment(dev)
    fla_fn, fla_note = _fla() if anchors else (None, "anchors off")
    rows: list[dict] = []
    sdpa_cache: dict[tuple[int, str], dict] = {}
    for mode in modes:
        decay = (1 - torch.exp2(-5 - torch.arange(heads, device=dev, dtype=torch.float32) * 5 / heads)
                 if mode == "decay" else None)  # RetNet-style per-head decays
        for S in lengths:
            B = max(1, tokens // S)
            q, k, v = _inputs(B, heads, S, head_dim, dtype, dev, grad=True)
            fn = lambda x=(q, k, v), d=decay: linear_attention(*x, decay=d, impl="triton")[0]  # noqa: E731
            timed = {direction: _time(direction, fn, [q, k, v], dev) for direction in directions}  # tunes on this shape
            check = _check(q, k, v, decay, dtype)
            anchor: dict[str, dict] = {direction: {} for direction in directions}
            if anchors:
                for direction in directions:
                    anchor[direction].update(_sdpa_row(q, k, v, direction, dev, sdpa_max_seq, sdpa_cache, mode))
                qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
                del q, k, v, fn
                torch.cuda.empty_cache()  # fla gets the memory ours had: only its own [B, T, H, D] copies stay
                for direction in directions:
                    anchor[direction].update(_fla_row(fla_fn, fla_note, qt, kt, vt, decay, direction, dev))
                del qt, kt, vt
            for direction in directions:
                ms, mem = timed[direction]
                row = {"suite": "linear", "op": direction, "mode": mode, "batch": B, "heads": heads, "seq": S,
                       "tokens": B * S, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."),
                       "chunk": 64, **check, **env, "impl": "longattn-triton", "ms": ms,
                       "tokens_per_s": B * S / ms * 1e3, "peak_mem_bytes": mem, **anchor[direction]}
                for key in ("fla_ms", "sdpa_cudnn_ms"):
                    if row.get(key):
                        row[key.replace("_ms", "_speedup")] = row[key] / ms if check["correct"] else None
                append_jsonl(out, row)
                rows.append(row)
            torch.cuda.empty_cache()
    rows += _decode_rows(heads, head_dim, dtype, decode_batches, dev, env, out)
    return rows


def _fla_row(fla_fn, note, qt, kt, vt, decay, direction, dev) -> dict:
    """fla-core's chunk_simple_gla on the same values in its [B, T, H, D] layout (``qt, kt, vt``); a per-head decay
    goes in as its native constant-decay argument (g_gamma), as ours takes ``decay``. Same timing as ours."""
    if fla_fn is None:
        return {"fla_ms": None, "fla_note": note}
    B, S = qt.shape[:2]
    g_gamma = None if decay is None else torch.log(decay)
    try:
        ms = _time(direction, lambda: fla_fn(qt, kt, vt, g_gamma=g_gamma, scale=qt.shape[-1] ** -0.5)[0],
                   [qt, kt, vt], dev)[0]
        return {"fla_ms": ms, "fla_tokens_per_s": B * S / ms * 1e3, "fla_api": "chunk_simple_gla(g_gamma)"}
    except (RuntimeError, TypeError, torch.OutOfMemoryError) as e:  # recorded, never silently dropped
        torch.cuda.empty_cache()
        return {"fla_ms": None, "fla_note": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def _sdpa_row(q, k, v, direction, dev, max_seq, cache, mode) -> dict:
    """cuDNN causal softmax attention on the same shapes (quadratic: skipped past ``max_seq``, noted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    S = q.shape[2]
    if max_seq < S:
        return {"sdpa_cudnn_ms": None, "sdpa_note": f"skipped: seq {S} > sdpa_max_seq {max_seq} (quadratic cost)"}
    key = (S, direction)
    if key not in cache:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def sdpa():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
        try:
            ms = _time(direction, sdpa, leaves, dev)[0]
            cache[key] = {"sdpa_cudnn_ms": ms, "sdpa_tokens_per_s": q.shape[0] * S / ms * 1e3}
        except (RuntimeError, torch.OutOfMemoryError) as e:
            torch.cuda.empty_cache()
            cache[key] = {"sdpa_cudnn_ms": None, "sdpa_note": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return cache[key]


def _decode_rows(heads, head_dim, dtype, batches, dev, env, out) -> list[dict]:
    """Latency of one decoding step (one token per sequence) from a state, checked against the PyTorch step."""
    rows = []
    for B in batches:
        q, k, v = (t.detach() for t in _inputs(B, heads, 1, head_dim, dtype, dev, grad=False))
        state = torch.randn(B, heads, head_dim, head_dim, device=dev)
        decay = torch.full((heads,), 0.99, device=dev)
        o, s = linear_attention_step(q, k, v, state, decay=decay, impl="triton")
        ro, rs = linear_attention_step(q.float(), k.float(), v.float(), state, decay=decay, impl="recurrent")
        err = max(_rel_err(o, ro), _rel_err(s, rs))
        ms = median_ms(lambda x=(q, k, v, state), d=decay: linear_attention_step(*x, decay=d, impl="triton"), dev)
        row = {"suite": "linear", "op": "decode_step", "impl": "longattn-triton", "batch": B, "heads": heads,
               "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."), "ms": ms, "us_per_step": ms * 1e3,
               "rel_err": err, "correct": err <= REL_TOL[dtype], **env}
        append_jsonl(out, row)
        rows.append(row)
    return rows


def crossover(rows: list[dict], direction: str = "fwdbwd", mode: str = "decay") -> int | None:
    """Shortest length at which our kernel beats cuDNN softmax attention (None if it never does in the rows)."""
    wins = [r["seq"] for r in rows if r.get("op") == direction and r.get("mode") == mode and r.get("sdpa_cudnn_ms")
            and r["correct"] and r["ms"] < r["sdpa_cudnn_ms"]]
    return min(wins) if wins else None


def _table(rows: list[dict]) -> str:
    lines = [f"{'mode':6} {'op':7} {'seq':>8} {'batch':>5} {'Mtok/s':>8} {'fla Mtok/s':>10} {'sdpa Mtok/s':>11} "
             f"{'vs fla':>7} {'ok':>3}"]
    for r in rows:
        if r["op"] == "decode_step":
            lines.append(f"decode B={r['batch']}: {r['us_per_step']:.1f} us/step  ok={r['correct']}")
            continue
        f = r.get("fla_tokens_per_s")
        s = r.get("sdpa_tokens_per_s")
        sp = r.get("fla_speedup")
        lines.append(f"{r['mode']:6} {r['op']:7} {r['seq']:>8} {r['batch']:>5} {r['tokens_per_s'] / 1e6:>8.2f} "
                     f"{f / 1e6 if f else float('nan'):>10.2f} {s / 1e6 if s else float('nan'):>11.2f} "
                     f"{sp if sp else float('nan'):>7.2f} {'y' if r['correct'] else 'N':>3}")
    for mode in {r.get("mode") for r in rows if r.get("mode")}:
        lines.append(f"crossover vs cuDNN softmax (fwd+bwd, {mode}): {crossover(rows, mode=mode)}")
    return "\n".join(lines)


def cmd(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("longattn bench linear needs CUDA (the Triton kernels; CPU runs are the tests' job)")
        return 2
    out = Path(args.out or f"benchmarks/results/linear-gpu-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    rows = run(args.lengths, tokens=args.tokens, heads=args.heads, head_dim=args.head_dim,
               dtype=getattr(torch, args.dtype), modes=tuple(args.modes), sdpa_max_seq=args.sdpa_max_seq,
               anchors=not args.no_anchors, out=out)
    print(_table(rows))
    print(f"rows: {out}")
    return 0 if all(r["correct"] for r in rows) else 1


def add_cli(bench_subparsers) -> None:
    """Register ``longattn bench linear`` on the ``bench`` sub-command group (wired by cli.py)."""
    p = bench_subparsers.add_parser("linear", help="linear attention tokens/s at constant tokens vs fla and cuDNN")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 262144, 1048576])
    p.add_argument("--tokens", type=int, default=1 << 20, help="batch × length kept constant")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--modes", nargs="+", default=["decay", "none"], choices=["decay", "none"])
    p.add_argument("--sdpa-max-seq", type=int, default=262144)
    p.add_argument("--no-anchors", action="store_true")
    p.add_argument("--out", default=None)
    p.set_defaults(fn=cmd)
