"""`longattn bench cp`, run under torchrun: context-parallel attention over the launched group (ring attention with
the zigzag or contiguous layout, Ulysses, their hybrid mesh) against one device's attention over the whole
sequence, forward and forward + backward. Every rank times the same calls (fixed repetitions, barriers around
them, the slowest rank's time reported); rank 0 checks each method's gathered output against the single-device
result and writes the rows."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from longattn.api import attention
from longattn.bench.timing import append_jsonl, environment
from longattn.distributed import (
    hybrid_attention,
    hybrid_groups,
    hybrid_shard,
    hybrid_unshard,
    ring_attention,
    shard,
    ulysses_attention,
    unshard,
)

METHODS = ("ring", "ring_contiguous", "ulysses", "hybrid")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _init() -> torch.device:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU); the device of this rank."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise SystemExit("bench cp: run under torchrun, e.g. `torchrun --nproc-per-node 2 -m longattn.cli bench "
                             "cp --lengths 32k`")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _time_collective(fn, device: torch.device, reps: int) -> float:
    """Milliseconds per call, the slowest rank's: every rank runs the same number of calls between barriers."""
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    took = torch.tensor([(time.perf_counter() - start) * 1e3 / reps], dtype=torch.float64, device=device)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took)


def _fwd_and_bwd_ms(fn, inputs: list, grad, device: torch.device, reps: int, **kw) -> tuple[float, float]:
    """(forward, forward + backward) milliseconds of ``fn(*inputs, **kw)``, the slowest rank's."""
    return (_time_collective(lambda: fn(*inputs, **kw), device, reps),
            _time_collective(lambda: fn(*inputs, **kw).backward(grad), device, reps))


class _Method:
    """One context-parallel method: how it shards, runs and reassembles a sequence on this rank."""

    def __init__(self, name: str, rank: int, world: int, ulysses_size: int):
        self.name, self.rank, self.world = name, rank, world
        self.layout = "zigzag" if name in ("ring", "hybrid") else "contiguous"
        self.kw: dict = {"layout": self.layout} if name.startswith("ring") else {}
        self.fn = {"ring": ring_attention, "ring_contiguous": ring_attention, "ulysses": ulysses_attention,
                   "hybrid": hybrid_attention}[name]
        if name == "hybrid":
            self.ulysses_size = ulysses_size
            self.groups = hybrid_groups(ulysses_size)
            self.kw = {"ulysses_group": self.groups[0], "ring_group": self.groups[1]}

    def shard(self, x):
        if self.name == "hybrid":
            return hybrid_shard(x, self.rank, self.world, self.ulysses_size)
        return shard(x, self.rank, self.world, layout=self.layout)

    def unshard(self, x):
        return hybrid_unshard(x, *self.groups) if self.name == "hybrid" else unshard(x, layout=self.layout)


def run(lengths: list[int], methods: list[str], *, heads: int, heads_kv: int, head_dim: int, dtype: torch.dtype,
        causal: bool, reps: int, out: Path | None, ulysses_size: int = 2) -> list[dict]:
    """Time and check every method at every length; rows (rank 0's list) also appended to ``out``."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; expected some of {list(METHODS)}")
    device = _init()
    rank, world = dist.get_rank(), dist.get_world_size()
    chosen = [_Method(name, rank, world, ulysses_size) for name in methods]
    rows = []
    for S in lengths:
        g = torch.Generator(device=device).manual_seed(S)  # the same full inputs on every rank
        q, k, v = (torch.randn(1, h, S, head_dim, generator=g, device=device, dtype=dtype)
                   for h in (heads, heads_kv, heads_kv))
        grad = torch.randn(1, heads, S, head_dim, generator=g, device=device, dtype=dtype)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        reference = attention(q, k, v, causal=causal)
        single = _fwd_and_bwd_ms(attention, full, grad, device, reps, causal=causal)
        for m in chosen:
            local = [m.shard(t).detach().requires_grad_() for t in (q, k, v)]
            gathered = m.unshard(m.fn(*local, causal=causal, **m.kw).detach())
            err = float((gathered.float() - reference.float()).abs().max())
            ms = _fwd_and_bwd_ms(m.fn, local, m.shard(grad), device, reps, causal=causal, **m.kw)
            name = m.name
            row = {"suite": "cp", "method": name, "layout": m.layout, "world": world, "backend": dist.get_backend(),
                   "seq": S, "seq_local": S // world, "heads_q": heads, "heads_kv": heads_kv, "head_dim": head_dim,
                   "dtype": str(dtype).removeprefix("torch."), "causal": causal, "ms_fwd": round(ms[0], 3),
                   "ms_fwd_bwd": round(ms[1], 3), "single_ms_fwd": round(single[0], 3),
                   "single_ms_fwd_bwd": round(single[1], 3), "speedup_fwd": round(single[0] / ms[0], 3),
                   "speedup_fwd_bwd": round(single[1] / ms[1], 3), "max_abs_err": err,
                   "ulysses_size": getattr(m, "ulysses_size", None), **environment(device)}
            rows.append(row)
            if rank == 0:
                print(f"{name:16s} W={world} S={S:>7d}  fwd {ms[0]:9.3f} ms ({row['speedup_fwd']:.2f}x one device)  "
                      f"fwd+bwd {ms[1]:9.3f} ms ({row['speedup_fwd_bwd']:.2f}x)  max err {err:.2e}", flush=True)
                if out is not None:
                    append_jsonl(out, row)
    return rows


def cmd(args: argparse.Namespace) -> int:
    from longattn.cli import _ints

    run(_ints(args.lengths), args.methods.split(","), heads=args.heads, heads_kv=args.heads_kv or args.heads,
        head_dim=args.head_dim, dtype=DTYPES[args.dtype], causal=not args.no_causal, reps=args.reps,
        out=Path(args.out) if args.out else None, ulysses_size=args.ulysses_size)
    dist.destroy_process_group()
    return 0


def add_cli(bench_subparsers) -> None:
    """Register ``longattn bench cp`` on the ``bench`` sub-command group (wired by cli.py)."""
    p = bench_subparsers.add_parser("cp", help="context parallelism (ring, Ulysses) under torchrun vs one device")
    p.add_argument("--lengths", default="32k,128k", help="whole-sequence tokens, split over the ranks")
    p.add_argument("--methods", default="ring,ring_contiguous,ulysses,hybrid",
                   help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--ulysses-size", type=int, default=2, help="hybrid: ranks per Ulysses group")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--heads-kv", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--no-causal", action="store_true", help="full (bidirectional) attention instead of causal")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None, help="JSONL file to append rows to (rank 0)")
    p.set_defaults(fn=cmd)
