"""The ``longattn`` command: methods, bench, demo."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        out.append(int(part[:-1]) * 1024 if part.endswith("k") else int(part))
    return out


def cmd_methods(args: argparse.Namespace) -> int:
    from longattn.methods.registry import table

    rows = table()
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in ("name", "family", "paper", "impls")}
    print("  ".join(k.ljust(w) for k, w in widths.items()))
    for r in rows:
        print("  ".join(r[k].ljust(w) for k, w in widths.items()))
    return 0


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from longattn.bench import kernels, summary

    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    if args.quick:
        lengths, heads, head_dim, dtype = [512, 1024], 2, 64, "fp32" if not on_gpu else args.dtype
        patterns = ["causal", "sliding_window", "random_90"]
    else:
        lengths, heads, head_dim, dtype = _ints(args.lengths), args.heads, args.head_dim, args.dtype
        patterns = args.patterns.split(",")
    unknown = [p for p in patterns if p not in kernels.PATTERNS]
    if unknown:
        raise SystemExit(f"--patterns: unknown {unknown}; valid: {', '.join(kernels.PATTERNS)}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    out = Path(args.out or f"benchmarks/results/kernels-{'gpu' if on_gpu else 'cpu'}-{stamp}.jsonl")
    rows = kernels.run(patterns, lengths, directions=tuple(args.directions.split(",")), heads=heads,
                       heads_kv=args.heads_kv, head_dim=head_dim, dtype=DTYPES[dtype], block=args.block, out=out,
                       device="cuda" if on_gpu else "cpu", anchors=not args.no_anchors)
    print(summary.markdown_table(rows, str(out)))
    if args.plot:
        summary.plot(rows, Path(args.plot))
        print(f"plot: {args.plot}")
    print(f"rows: {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Main job on a fresh CPU machine: the quick kernel benchmark (until the eval harness lands)."""
    args.quick = True
    args.out = args.out or "reports/demo-kernels.jsonl"  # reports/ is git-ignored: the demo never dirties the tree
    args.plot = args.plot or "reports/demo-kernels.png"
    return cmd_bench_kernels(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longattn", description="Fast, measured long-context attention.")
    p.add_argument("-v", "--verbose", action="store_true", help="log backend choices")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list registered patterns and methods").set_defaults(fn=cmd_methods)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="suite", required=True)
    for parser, fn in ((bench.add_parser("kernels", help="patterns × lengths × fwd/bwd vs SDPA and FlexAttention"),
                        cmd_bench_kernels),
                       (sub.add_parser("demo", help="quick CPU run of the kernel benchmark"), cmd_demo)):
        parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU friendly)")
        parser.add_argument("--patterns", default="causal,sliding_window,sink_window,dilated,random_90,random_0")
        parser.add_argument("--lengths", default="16k,32k,64k,128k")
        parser.add_argument("--directions", default="fwd,bwd")
        parser.add_argument("--heads", type=int, default=32)
        parser.add_argument("--heads-kv", type=int, default=None)
        parser.add_argument("--head-dim", type=int, default=128)
        parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
        parser.add_argument("--block", type=int, default=128)
        parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
        parser.add_argument("--no-anchors", action="store_true", help="skip SDPA / FlexAttention anchors")
        parser.add_argument("--out", default=None, help="JSONL file to append rows to")
        parser.add_argument("--plot", default=None, help="PNG path for the summary plot")
        parser.set_defaults(fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
