"""Summaries of benchmark JSONL: a markdown table (for BENCHMARKS.md) and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path


def load(paths: list[Path]) -> list[dict]:
    """All rows of the given JSONL files."""
    rows = []
    for p in paths:
        rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return rows


def _seq(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _fmt(x, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


_CORRECT = {True: "yes", False: "**NO**", None: "not checked"}


def markdown_table(rows: list[dict], source: str) -> str:
    """One line per (pattern, length, direction): our time, anchors, ratios, correctness."""
    head = ("| op | pattern | seq | density vs causal | ours ms | TFLOP/s (retained) | cuDNN causal ms | "
            "flash causal ms | flex ms | frac of ideal | × vs flex | max err | correct |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in sorted(rows, key=lambda r: (r["op"], r["pattern"], r["seq_q"])):
        lines.append(
            f"| {r['op']} | {r['pattern']} | {_seq(r['seq_q'])} | {r['density_vs_causal']:.3f} | {r['ms']:.2f} | "
            f"{r['tflops_actual']:.3g} | {_fmt(r.get('sdpa_cudnn_causal_ms'))} | "
            f"{_fmt(r.get('sdpa_flash_causal_ms'))} | "
            f"{_fmt(r.get('flex_ms'))} | {_fmt(r.get('frac_of_ideal'))} | {_fmt(r.get('speedup_vs_flex'))} | "
            f"{_fmt(r['max_abs_err'], '.1e')} | {_CORRECT[r['correct']]} |")
    meta = rows[0] if rows else {}
    return (f"Device: {meta.get('device')}, torch {meta.get('torch')}, triton {meta.get('triton')}, "
            f"git {meta.get('git_sha')}; raw rows: `{source}`\n\n" + head + "\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    """TFLOP/s on retained work vs sequence length, per pattern and direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, op in zip(axes, ("fwd", "bwd"), strict=True):
        for pattern in sorted({r["pattern"] for r in rows}):
            pts = sorted((r["seq_q"], r["tflops_actual"]) for r in rows if r["op"] == op and r["pattern"] == pattern)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pattern)
        cudnn = sorted({(r["seq_q"], r["sdpa_cudnn_causal_ms"]) for r in rows
                        if r["op"] == op and r.get("sdpa_cudnn_causal_ms")})
        if cudnn:
            ref = next(r for r in rows if r["op"] == op)
            flops = [(4.0 if op == "fwd" else 10.0) * ref["batch"] * ref["heads_q"] * s * (s + 1) / 2 * ref["head_dim"]
                     / ms / 1e9 for s, ms in cudnn]
            ax.plot([c[0] for c in cudnn], flops, "k--", label="cuDNN dense causal")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{op}: TFLOP/s on retained work")
        ax.set_xlabel("sequence length")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
