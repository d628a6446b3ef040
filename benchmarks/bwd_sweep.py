"""Backward of the block-sparse kernels on one GPU call (H=32, d=128, bf16): every forced (tile, warps, stages) of
the dQ and dK/dV kernels, the whole backward with the autotuned pick split per kernel, beside compiled
FlexAttention's backward and cuDNN's dense causal backward (the base of the ideal). A module path given as
BASELINE (e.g. a copy of an older kernels file) is timed the same way first. Tuning notes: NOTES-kernels.md.

Usage: python benchmarks/bwd_sweep.py [SEQ] [PATTERNS]   (compiles configs in parallel worker processes first)
"""

import importlib.util
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import torch
from triton.testing import do_bench

from longattn.bench.kernels import PATTERNS
from longattn.kernels import block_sparse as kbs
from longattn.masks.block_sparse import BlockSparse

S = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
NAMES = sys.argv[2].split(",") if len(sys.argv) > 2 else ["sliding_window", "random_90"]
H, D, BLOCK = 32, 128, 128
DQ = [(64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 2), (64, 8, 3), (64, 8, 4), (32, 4, 3), (32, 4, 4), (32, 4, 5),
      (128, 8, 2), (128, 8, 3)]
DKDV = [(32, 4, 3), (32, 4, 4), (32, 4, 5), (32, 8, 3), (32, 8, 4), (64, 8, 2), (64, 8, 3), (64, 8, 4), (64, 4, 2),
        (64, 4, 3), (16, 4, 3), (16, 4, 4)]


def _force(kern, name: str, cfg: tuple[int, int, int]) -> None:
    """Make an autotuned kernel run exactly one config (no benchmarking)."""
    import triton
    kern.configs = [triton.Config({name: cfg[0]}, num_warps=cfg[1], num_stages=cfg[2])]
    kern.cache.clear()


def _inputs(heads: int, name: str):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, heads, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    bs = BlockSparse.from_mask_mod(PATTERNS[name](S, heads, BLOCK, "cuda"), 1, heads, S, S, BLOCK, device="cuda")
    out, lse = kbs.block_sparse_forward(q, k, v, bs, D ** -0.5)
    return q, k, v, do, out, lse, bs


def _compile(job) -> str:
    """Worker: run one forced config on a 2-head problem of each pattern so its binaries land in the on-disk
    Triton cache (the sweep then loads them instead of compiling serially)."""
    kind, cfg = job
    _force(kbs._bwd_dq_kernel if kind == "dq" else kbs._bwd_dkdv_kernel, "BLOCK_N" if kind == "dq" else "BLOCK_M1",
           cfg)
    try:
        for name in NAMES:
            q, k, v, do, out, lse, bs = _inputs(2, name)
            kbs.block_sparse_backward(do, q, k, v, out, lse, None, bs, D ** -0.5)
        torch.cuda.synchronize()
        return f"{kind} {cfg} ok"
    except Exception as e:  # out of resources: reported, skipped in the sweep
        return f"{kind} {cfg} failed {str(e)[:60]}"


def _bwd_ms(mod, q, k, v, do, out, lse, bs) -> float:
    return do_bench(lambda: mod.block_sparse_backward(do, q, k, v, out, lse, None, bs, D ** -0.5), warmup=25,
                    rep=200, return_mode="median")


def _profile_split(q, k, v, do, out, lse, bs) -> str:
    from torch.profiler import ProfilerActivity, profile
    kbs.block_sparse_backward(do, q, k, v, out, lse, None, bs, D ** -0.5)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            kbs.block_sparse_backward(do, q, k, v, out, lse, None, bs, D ** -0.5)
        torch.cuda.synchronize()
    parts = {}
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            parts[ev.key[:40]] = ev.device_time_total / 5 / 1e3
    return ", ".join(f"{k} {ms:.2f}" for k, ms in sorted(parts.items(), key=lambda x: -x[1])[:5])


def _anchor_bwd_ms(fn, leaves) -> float:
    out = fn()
    dout = torch.randn_like(out)
    return do_bench(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True), warmup=25, rep=200,
                    return_mode="median")


def main() -> None:
    import torch.multiprocessing as mp
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention
    jobs = [("dq", c) for c in DQ] + [("dkdv", c) for c in DKDV]
    with ProcessPoolExecutor(max_workers=min(12, os.cpu_count() or 4), mp_context=mp.get_context("spawn")) as ex:
        for line in ex.map(_compile, jobs):
            print("compile", line, flush=True)
    leaves = [torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = _anchor_bwd_ms(lambda: torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True),
                               leaves)
    print(f"cuDNN dense causal bwd S={S}: {cudnn:.2f} ms", flush=True)
    baseline = None
    if os.environ.get("BASELINE"):
        spec = importlib.util.spec_from_file_location("baseline_kernels", os.environ["BASELINE"])
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
    dq_all, dkdv_all = list(kbs._bwd_dq_kernel.configs), list(kbs._bwd_dkdv_kernel.configs)
    for name in NAMES:
        q, k, v, do, out, lse, bs = _inputs(H, name)
        dens = bs.density() * S * S / (S * (S + 1) / 2)
        ideal = cudnn * dens
        print(f"== {name} S={S} density vs causal {dens:.3f}, ideal {ideal:.2f} ms", flush=True)
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False)
        bm = bs.to_flex()
        fl = [t.detach().requires_grad_(True) for t in (q, k, v)]
        f_ms = _anchor_bwd_ms(lambda flex=flex, fl=fl, bm=bm: flex(*fl, block_mask=bm), fl)
        print(f"flex bwd: {f_ms:.2f} ms (frac of ideal {ideal / f_ms:.3f})", flush=True)
        if baseline is not None:
            b_ms = _bwd_ms(baseline, q, k, v, do, out, lse, bs)
            print(f"baseline bwd (autotuned): {b_ms:.2f} ms (frac {ideal / b_ms:.3f}); dq "
                  f"{baseline._bwd_dq_kernel.best_config}; dkdv {baseline._bwd_dkdv_kernel.best_config}", flush=True)
        for kern, cfgs in ((kbs._bwd_dq_kernel, dq_all), (kbs._bwd_dkdv_kernel, dkdv_all)):
            kern.configs = cfgs
            kern.cache.clear()
        a_ms = _bwd_ms(kbs, q, k, v, do, out, lse, bs)
        dq_best, dkdv_best = kbs._bwd_dq_kernel.best_config, kbs._bwd_dkdv_kernel.best_config
        print(f"ours bwd (autotuned): {a_ms:.2f} ms (frac {ideal / a_ms:.3f}, {a_ms / f_ms:.3f}x flex time); "
              f"dq {dq_best}; dkdv {dkdv_best}", flush=True)
        print("  split:", _profile_split(q, k, v, do, out, lse, bs), flush=True)
        best = {}
        for kind, cfgs, other in (("dq", DQ, dkdv_best), ("dkdv", DKDV, dq_best)):
            # the other kernel pinned to its autotuned pick; each row is the whole backward
            okern, oname = (kbs._bwd_dkdv_kernel, "BLOCK_M1") if kind == "dq" else (kbs._bwd_dq_kernel, "BLOCK_N")
            okern.configs = [other]
            okern.cache.clear()
            kern, kname = (kbs._bwd_dq_kernel, "BLOCK_N") if kind == "dq" else (kbs._bwd_dkdv_kernel, "BLOCK_M1")
            for cfg in cfgs:
                _force(kern, kname, cfg)
                try:
                    ms = _bwd_ms(kbs, q, k, v, do, out, lse, bs)
                except Exception as e:
                    print(f"  {kind} {cfg}: failed {str(e)[:60]}")
                    continue
                best.setdefault(kind, (ms, cfg))
                best[kind] = min(best[kind], (ms, cfg))
                print(f"  {kind} {cfg}: whole bwd {ms:.2f} ms (frac {ideal / ms:.3f})", flush=True)
            kern.configs = dq_all if kind == "dq" else dkdv_all
        _force(kbs._bwd_dq_kernel, "BLOCK_N", best["dq"][1])
        _force(kbs._bwd_dkdv_kernel, "BLOCK_M1", best["dkdv"][1])
        ms = _bwd_ms(kbs, q, k, v, do, out, lse, bs)
        print(f"best pair dq {best['dq'][1]} dkdv {best['dkdv'][1]}: {ms:.2f} ms (frac {ideal / ms:.3f}, "
              f"{ms / f_ms:.3f}x flex time)", flush=True)
        print("  split:", _profile_split(q, k, v, do, out, lse, bs), flush=True)
        for kern in (kbs._bwd_dq_kernel, kbs._bwd_dkdv_kernel):
            kern.configs = dq_all if kern is kbs._bwd_dq_kernel else dkdv_all
            kern.cache.clear()
        del q, k, v, do, out, lse, bs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
