"""The ``longattn`` command: methods, eval, report, bench, demo."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_dtype(name: str, device: str) -> torch.dtype:
    """``auto``: bf16 on a GPU or on a CPU with bf16 matrix units (AMX, AVX512-BF16); fp32 on other CPUs, which
    emulate bf16 matmuls (a 2k prefill of the embedded model: 68.8 s in bf16, 13.3 s in fp32 on an AVX2 EPYC)."""
    if name != "auto":
        return DTYPES[name]
    if device == "cuda":
        return torch.bfloat16
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private torch.cpu probes: absent -> False
    native = any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return torch.bfloat16 if native else torch.float32


def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        out.append(int(part[:-1]) * 1024 if part.endswith("k") else int(part))
    return out


def _specs(text: str) -> list[str]:
    """Split a comma list of specs, keeping commas inside brackets (``tidaldecode:selection_layers=(2,13)``)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [s for s in (*out, cur) if s.strip()]


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


def cmd_bench_model(args: argparse.Namespace) -> int:
    from longattn.bench import model

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    out = Path(args.out or f"benchmarks/results/model-{args.shape}-{stamp}.jsonl")
    model.run(args.methods.split(","), _ints(args.lengths), shape=args.shape, reps=args.reps, layers=args.layers,
              out=out)
    print(f"rows: {out}")
    return 0


DEMO_METHODS = ("dense", "streaming:num_sinks=4:window=1024", "sliding_window:window=1024",
                "minference_block:top_k=8", "power:granularity=128:local=2")


def cmd_eval(args: argparse.Namespace) -> int:
    """Tasks × lengths × depths × methods on one model; JSONL rows (resumable), a table and an HTML report."""
    from longattn.bench.timing import environment
    from longattn.eval import report, runner
    from longattn.eval.methods import expand_budgets, parse_decode, parse_method
    from longattn.eval.tasks import TASKS
    from longattn.hf.models import load_model

    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in (*TASKS, "perplexity")]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; valid: {', '.join(TASKS)}, perplexity")
    # every spec is checked before a model loads: unknown names and knobs, bad knob values
    try:
        methods = [parse_method(m) for m in _specs(args.methods)]
    except ValueError as e:
        raise SystemExit(f"--methods {args.methods!r}: {e}") from None
    policies = [m.label for m in methods if m.family == "decode"]
    if policies:
        raise SystemExit(f"--methods: {policies} are decode policies; pass them with --decode")
    try:
        decodes = [parse_decode(d) for d in _specs(args.decode)]
    except ValueError as e:
        raise SystemExit(f"--decode {args.decode!r}: {e}") from None
    try:
        decodes = expand_budgets(decodes, _ints(args.budgets) if args.budgets else None)
    except ValueError as e:
        raise SystemExit(f"--budgets {args.budgets!r}: {e}") from None
    settings = args.kv_setting.split(",")
    if not settings or any(x not in runner.SETTINGS for x in settings):
        raise SystemExit(f"--kv-setting {args.kv_setting!r}: expected a comma list of {', '.join(runner.SETTINGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    model, tokenizer = load_model(args.model, dtype=model_dtype(args.dtype, device))
    model.to(device)
    max_len = getattr(model.config, "max_position_embeddings", None)
    lengths = _ints(args.lengths)
    if max_len and max(lengths) > max_len:
        raise SystemExit(f"--lengths: {max(lengths)} exceeds the model's {max_len} positions")
    jobs = runner.grid(tasks, lengths, [float(d) for d in args.depths.split(",")], methods,
                       seeds=range(args.seeds), haystacks=args.haystack.split(","), decodes=decodes,
                       settings=settings)
    out, name = Path(args.out), args.model or "smollm2-135m-instruct"
    new = runner.run(jobs, model, tokenizer, out, model_name=name, impl=args.impl,
                     environment={k: v for k, v in environment(torch.device(device)).items() if k != "device"})
    rows = runner.rows_of(jobs, out, model_name=name, dtype=model.dtype)
    print(report.markdown(rows, per_task=not args.brief))
    html = report.write_html(rows, Path(args.report or out.with_suffix(".html")))
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        print(f"skipped {len(skipped)} rows, e.g. {skipped[0]['decode']} at {skipped[0]['tokens']} tokens: "
              f"{skipped[0]['skipped']}")
    print(f"rows: {out} ({len(rows)} in this grid, {len(new)} new) · report: {html}")
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    """Per layer/head attention-mass recall and output error of each method vs dense on the model's real q/k/v."""
    import json

    from longattn.eval.fidelity import measure
    from longattn.eval.methods import parse_method
    from longattn.eval.perplexity import text_ids
    from longattn.hf.models import load_model
    from longattn.jsonl import open_append

    specs = [parse_method(m) for m in args.methods.split(",")]
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
    out = Path(args.out)
    print("| method | length | density | mass recall (mean / min head) | output rel. error (mean / max head) |")
    print("|---|---|---|---|---|")
    with open_append(out) as f:
        for n in _ints(args.lengths):
            ids = text_ids(tokenizer, n, args.haystack)
            for spec in specs:
                rows = measure(model, ids, spec, args.impl)
                for r in rows:
                    f.write(json.dumps({"method": spec.label, "length": n, "haystack": args.haystack} | r) + "\n")
                rec = [r["mass_recall"] for r in rows]
                err = [r["out_rel_err"] for r in rows]
                dens = sum(r["density"] for r in rows) / len(rows)
                print(f"| {spec.label} | {n} | {dens:.3f} | {sum(rec) / len(rec):.3f} / {min(rec):.3f} | "
                      f"{sum(err) / len(err):.3f} / {max(err):.3f} |", flush=True)
    print(f"rows: {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from longattn.eval import report

    rows = report.load_rows([Path(p) for p in args.results])
    if not rows:
        raise SystemExit(f"results: no eval rows in {args.results}")
    print(report.markdown(rows))
    print(f"report: {report.write_html(rows, Path(args.out))}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Main job on a fresh CPU machine: a small NIAH grid on the embedded model, dense beside four sparse methods."""
    return cmd_eval(args)


def build_parser() -> argparse.ArgumentParser:
    from longattn import calibrate, cost
    from longattn.bench import decode as bench_decode
    from longattn.bench import distributed as bench_distributed
    from longattn.bench import generate as bench_generate
    from longattn.bench import linear as bench_linear
    from longattn.eval import recall

    p = argparse.ArgumentParser(prog="longattn", description="Fast, measured long-context attention.")
    p.add_argument("-v", "--verbose", action="store_true", help="log backend choices")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list registered patterns and methods").set_defaults(fn=cmd_methods)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="suite", required=True)
    for parser, fn in ((bench.add_parser("kernels", help="patterns × lengths × fwd/bwd vs SDPA and FlexAttention"),
                        cmd_bench_kernels),
                       ):
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
        parser.add_argument("--out", default=None, help="JSONL file to append rows to; cases it already holds "
                            "for this device, versions and commit are not re-run (resume)")
        parser.add_argument("--plot", default=None, help="PNG path for the summary plot")
        parser.set_defaults(fn=fn)
    for name, fn, helptext, defaults in (
            ("eval", cmd_eval, "accuracy and speed of methods on long-context tasks (embedded model by default)",
             {"tasks": "niah_single", "lengths": "2k,4k,8k", "methods": "dense", "out": "reports/eval.jsonl"}),
            ("demo", cmd_demo, "main job: NIAH grid on the embedded model, dense + 4 sparse methods, on CPU",
             {"tasks": "passkey", "lengths": "1k,2k,4k", "methods": ",".join(DEMO_METHODS),
              "out": "reports/demo.jsonl", "brief": True})):
        e = sub.add_parser(name, help=helptext)
        e.add_argument("--tasks", default=defaults["tasks"], help="comma list: passkey, niah_single, niah_multikey, "
                       "niah_multivalue, niah_multiquery, variable_tracking, common_words, frequent_words, perplexity")
        e.add_argument("--lengths", default=defaults["lengths"], help="prompt tokens, e.g. 2k,4k,8000")
        e.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths (fractions)")
        e.add_argument("--methods", default=defaults["methods"],
                       help="prefill: comma list of dense | NAME | NAME:knob=value:knob=value (see `longattn methods`)")
        e.add_argument("--decode", default="dense",
                       help="decode-time KV policies, comma list of dense | POLICY[:knob=value...] (decode family in "
                            "`longattn methods`); each runs with every --methods entry")
        e.add_argument("--budgets", default=None,
                       help="e.g. 256,512,1k: run each --decode policy that takes a budget (and sets none) once per "
                            "budget (tokens per kv head)")
        e.add_argument("--kv-setting", default="aware",
                       help="decode policies' setting, comma list: aware (compress the whole prompt, question "
                            "included) and/or agnostic (compress the context, then feed the question)")
        e.add_argument("--haystack", default="noise", help="noise, essay or both (comma list)")
        e.add_argument("--seeds", type=int, default=1)
        e.add_argument("--model", default=None, help="local HF folder or cached hub id (default: embedded model)")
        e.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                       help="auto: bf16 on a GPU or a CPU with bf16 units (AMX/AVX512-BF16), else fp32 (emulated bf16 "
                       "is ~5x slower)")
        e.add_argument("--device", choices=["auto", "cpu"], default="auto")
        e.add_argument("--impl", default="auto", help="attention backend (as in longattn.attention)")
        e.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
        e.add_argument("--out", default=defaults["out"], help="JSONL results (rows already there are skipped)")
        e.add_argument("--report", default=None, help="HTML report path (default: next to --out)")
        e.add_argument("--brief", action="store_true", default=defaults.get("brief", False),
                       help="print the per-method table only")
        e.set_defaults(fn=fn)
        if name == "eval":  # `longattn eval recall ...`: the MQAR recall-vs-state sweep
            recall.add_cli(e.add_subparsers(dest="eval_command", required=False))
    fid = sub.add_parser("fidelity", help="attention-mass recall and output error per layer/head vs dense")
    fid.add_argument("--methods", default="minference_block")
    fid.add_argument("--lengths", default="4k")
    fid.add_argument("--haystack", default="essay")
    fid.add_argument("--model", default=None)
    fid.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    fid.add_argument("--impl", default="auto")
    fid.add_argument("--out", default="reports/fidelity.jsonl")
    fid.set_defaults(fn=cmd_fidelity)
    r = sub.add_parser("report", help="HTML + PNG report from eval JSONL files")
    r.add_argument("results", nargs="+")
    r.add_argument("--out", default="reports/report.html")
    r.set_defaults(fn=cmd_report)
    m = bench.add_parser("model", help="prefill time of a random 8B-shaped model: dense cuDNN vs sparse methods")
    m.add_argument("--methods", default="minference_block", help="comma list of NAME[:knob=value...]")
    m.add_argument("--lengths", default="32k,64k,128k")
    m.add_argument("--shape", default="llama3-8b")
    m.add_argument("--layers", type=int, default=None, help="fewer layers for a quick look (default: the shape's)")
    m.add_argument("--reps", type=int, default=3)
    m.add_argument("--out", default=None)
    m.set_defaults(fn=cmd_bench_model)
    bench_linear.add_cli(bench)
    bench_decode.add_cli(bench)
    bench_generate.add_cli(bench)
    bench_distributed.add_cli(bench)
    cost.add_cli(sub)
    calibrate.add_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
