"""``longattn bench generate``: decode time per token of a random 8B-shaped model under ``model.generate``, the
stock model (SDPA, transformers' DynamicCache) against decode policies patched in with ``longattn.patch`` (their
LongattnCache, read by the Triton decode kernel where the read allows). Per-token time is taken from two generate
calls that differ only in how many tokens they produce, so the prefill (and a policy's compression) cancels out.
Each policy row first checks its kernel read against the torch read (``read_check``); a failed check reports the
row without a speed-up."""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from longattn.bench.model import random_model
from longattn.bench.timing import append_jsonl, environment
from longattn.hf import kernel_read
from longattn.hf.cache import attend_cached

READ_CHECK_MAX = 16.0  # kernel read error (half-ulps of the cache dtype) above which a row shows no speed-up


def _generate_ms(model, ids: torch.Tensor, new: int, **kwargs) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def per_token_ms(model, ids: torch.Tensor, steps: int, reps: int, cache_factory=None) -> tuple[float, int]:
    """(median decode ms per token over ``reps`` pairs of runs, peak bytes of the longer run). ``cache_factory``
    builds a fresh policy cache per generate call (None: the model's own cache)."""
    def run(new: int) -> float:
        kwargs = {} if cache_factory is None else cache_factory()
        return _generate_ms(model, ids, new, **kwargs)

    run(2)  # warm-up: compiles and autotunes what the step runs
    per = []
    for _ in range(reps):
        short = run(1)
        torch.cuda.reset_peak_memory_stats()
        long = run(steps + 1)
        per.append((long - short) / steps)
    return statistics.median(per), int(torch.cuda.max_memory_allocated())


def read_check(model, ids: torch.Tensor, cache_factory) -> float:
    """Every layer's cached read, checked in the same run: after the prompt and one decoding step, a random query per
    layer reads the policy's cache (with the policy's selection for it) through the kernel path and through the
    torch path in float32; returns the largest kernel error in units of half an ulp of the cache's dtype at the
    output's magnitude. The kernel's own rounding (P in 16 bits) costs a few; a wrong slot, page or length moves the
    output by about its size, hundreds of units in bf16."""
    kwargs = cache_factory()
    cache = next(iter(kwargs.values()))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, **kwargs)
    saved, worst = kernel_read.KERNEL_DEVICES, 0.0
    g = torch.Generator(ids.device).manual_seed(0)
    for i, layer in enumerate(cache.layers):
        B, Hkv, _, D = layer.kv_shape() if hasattr(layer, "kv_shape") else layer.keys.shape
        Hq = model.config.num_attention_heads
        q = torch.randn(B, Hq, 1, D, device=ids.device, generator=g).to(model.dtype)
        selection = cache.policy.select(i, q, layer)
        try:
            kernel_read.KERNEL_DEVICES = set()
            ref = attend_cached(q.float(), layer, selection)
        finally:
            kernel_read.KERNEL_DEVICES = saved
        fast = attend_cached(q, layer, selection)
        # half an ulp of the cache dtype at the output's magnitude (float32 caches round nothing here)
        rounding = torch.finfo(q.dtype).eps / 2 * ref.abs().max().clamp(min=1e-6)
        worst = max(worst, float((fast.float() - ref).abs().max() / rounding))
    return worst


def run(policies: list[str], lengths: list[int], *, shape: str = "llama3-8b", steps: int = 32, reps: int = 3,
        layers: int | None = None, out: Path) -> list[dict]:
    """One row per (length, policy): decode ms per token, tokens/s, the speed-up vs the stock model, peak GB."""
    from longattn.eval.methods import applied, parse_decode, parse_method
    from longattn.hf.compat import cache_kwargs

    if not torch.cuda.is_available():
        raise SystemExit("bench generate: needs a CUDA device (decoding an 8B-shaped model)")
    specs = [parse_decode(p) for p in policies]
    dev = torch.device("cuda")
    model = random_model(shape, dev, torch.bfloat16, max(lengths) + steps + 2, layers)
    env = environment(dev)
    rows = []
    for n in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=dev,
                            generator=torch.Generator(dev).manual_seed(n))
        base = None
        for spec in specs:
            try:
                if spec.name == "dense":
                    ms, peak = per_token_ms(model, ids, steps, reps)
                    check = None
                else:
                    with applied(model, parse_method("dense"), decode=spec) as handle:
                        factory = lambda h=handle: cache_kwargs(model, h.cache())  # noqa: E731
                        check = read_check(model, ids, factory)
                        ms, peak = per_token_ms(model, ids, steps, reps, factory)
                base = base or (ms if spec.name == "dense" else None)
                error = None if check is None or check <= READ_CHECK_MAX else \
                    f"read check failed: kernel read error {check:.3g} half-ulps from the float32 torch read"
                rows.append(_row(env, shape, n, spec, ms, base, peak, error, out, check))
            except (RuntimeError, ValueError) as e:
                rows.append(_row(env, shape, n, spec, None, base, None, str(e)[:300], out))
            torch.cuda.empty_cache()
    return rows


def _row(env, shape, n, spec, ms, base, peak, error, out, check=None) -> dict:
    ok = error is None and ms is not None
    row = {"bench": "generate", "shape": shape, "context": n, "policy": spec.label, "config": spec.knobs,
           "decode_ms_per_token": None if ms is None else round(ms, 3),
           "tokens_per_s": None if ms is None else round(1e3 / ms, 1),
           "speedup_vs_stock": round(base / ms, 3) if ok and base is not None else None,
           "read_check": check,
           "peak_gb": None if peak is None else round(peak / 2**30, 2), "error": error} | env
    append_jsonl(out, row)
    print(f"{shape} {n:>7} {spec.label:<32} {row['decode_ms_per_token']} ms/token  x{row['speedup_vs_stock']}"
          + (f"  ERROR {error}" if error else ""), flush=True)
    return row


def add_cli(bench: argparse._SubParsersAction) -> None:
    from longattn.cli import _ints

    g = bench.add_parser("generate", help="decode ms/token of a random 8B-shaped model under model.generate: stock "
                                          "vs patched decode policies")
    g.add_argument("--policies", default="dense,snapkv:budget=2048", help="comma list; 'dense' = the stock model")
    g.add_argument("--lengths", default="8k,32k")
    g.add_argument("--shape", default="llama3-8b")
    g.add_argument("--layers", type=int, default=None, help="fewer layers for a quick look (default: the shape's)")
    g.add_argument("--steps", type=int, default=32, help="decode steps timed per run")
    g.add_argument("--reps", type=int, default=3)
    g.add_argument("--out", default=None)

    def cmd(args: argparse.Namespace) -> int:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        out = Path(args.out or f"benchmarks/results/generate-{args.shape}-{stamp}.jsonl")
        run(args.policies.split(","), _ints(args.lengths), shape=args.shape, steps=args.steps, reps=args.reps,
            layers=args.layers, out=out)
        print(f"rows: {out}")
        return 0

    g.set_defaults(fn=cmd)
