"""Turn eval rows into tables (markdown / HTML) and plots: NIAH heatmaps (depth × length) per method, accuracy vs
density and vs prefill time, so accuracy always sits beside the speed it buys."""

from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from pathlib import Path

NEEDLE_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")


def load_rows(paths: list[Path]) -> list[dict]:
    """Rows of the JSONL files (torn lines skipped)."""
    rows = []
    for path in paths:
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return [r for r in rows if "correct" in r or "perplexity" in r]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _methods(rows: list[dict]) -> list[str]:
    """Dense first, then the others in order of first appearance."""
    seen = list(dict.fromkeys(r["method"] for r in rows))
    return sorted(seen, key=lambda m: m != "dense")


def summary(rows: list[dict]) -> list[dict]:
    """One row per method: accuracy (%) per length and overall, mean density, mean prefill ms per length."""
    rows = [r for r in rows if r.get("correct") is not None]
    lengths = sorted({r["length"] for r in rows})
    out = []
    for m in _methods(rows):
        mine = [r for r in rows if r["method"] == m]
        entry = {"method": m, "samples": len(mine), "accuracy": 100 * _mean([r["correct"] for r in mine]),
                 "density": _mean([r["density"] for r in mine])}
        for n in lengths:
            at = [r for r in mine if r["length"] == n]
            entry[f"acc@{n}"] = 100 * _mean([r["correct"] for r in at])
            entry[f"density@{n}"] = _mean([r["density"] for r in at])
            entry[f"prefill_ms@{n}"] = _mean([r["prefill_ms"] for r in at])
        out.append(entry)
    return out


def markdown(rows: list[dict], *, per_task: bool = True) -> str:
    """Accuracy per method and length (density in brackets: retained fraction of causal attention work), then
    per task, then perplexity when measured."""
    ppl = [r for r in rows if r.get("perplexity") is not None]
    rows = [r for r in rows if r.get("correct") is not None]
    if not rows:
        return _perplexity_table(ppl)
    lengths = sorted({r["length"] for r in rows})
    lines = ["| method | " + " | ".join(f"{n} acc % (density)" for n in lengths) + " | all acc % | samples |",
             "|---|" + "---|" * (len(lengths) + 2)]
    for e in summary(rows):
        cells = [f"{e[f'acc@{n}']:.1f} ({e[f'density@{n}']:.2f})" for n in lengths]
        lines.append(f"| {e['method']} | " + " | ".join(cells) + f" | {e['accuracy']:.1f} | {e['samples']} |")
    if per_task:
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        lines += ["", "| method | length | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        for m in _methods(rows):
            for n in lengths:
                cells = []
                for t in tasks:
                    at = [r["correct"] for r in rows if r["method"] == m and r["length"] == n and r["task"] == t]
                    cells.append(f"{100 * _mean(at):.0f}" if at else "–")
                lines.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\n" + _perplexity_table(ppl) if ppl else "")


def _perplexity_table(rows: list[dict]) -> str:
    lengths = sorted({r["length"] for r in rows})
    lines = ["| method | " + " | ".join(f"ppl @ {n} (density)" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for m in _methods(rows):
        cells = []
        for n in lengths:
            at = [r for r in rows if r["method"] == m and r["length"] == n]
            cells.append(f"{_mean([r['perplexity'] for r in at]):.3f} ({_mean([r['density'] for r in at]):.2f})"
                         if at else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heatmaps(rows: list[dict], path: Path) -> Path | None:
    """One panel per method: mean correctness of the needle tasks by depth (rows) and length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    needle = [r for r in rows if r["task"] in NEEDLE_TASKS and r.get("correct") is not None]
    if not needle:
        return None
    methods = _methods(needle)
    lengths = sorted({r["length"] for r in needle})
    depths = sorted({r["depth"] for r in needle})
    cols = min(4, len(methods))
    fig, axes = plt.subplots((len(methods) + cols - 1) // cols, cols, figsize=(3.2 * cols, 2.8 * ((len(methods) +
                             cols - 1) // cols)), squeeze=False)
    for ax, m in zip(axes.flat, methods, strict=False):
        cell = defaultdict(list)
        for r in needle:
            if r["method"] == m:
                cell[(r["depth"], r["length"])].append(r["correct"])
        grid = [[_mean(cell[(d, n)]) for n in lengths] for d in depths]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_title(m, fontsize=8)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "–" if v != v else f"{v:.0%}", ha="center", va="center", fontsize=7)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    fig.supxlabel("context length (tokens)")
    fig.supylabel("needle depth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pareto(rows: list[dict], path: Path) -> Path:
    """Accuracy vs retained attention density and vs prefill time, one point per (method, length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("correct") is not None]
    lengths = sorted({r["length"] for r in rows})
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "osD^v<>p*h"
    for i, m in enumerate(_methods(rows)):
        for j, n in enumerate(lengths):
            at = [r for r in rows if r["method"] == m and r["length"] == n]
            if not at:
                continue
            acc = 100 * _mean([r["correct"] for r in at])
            kw = {"marker": markers[j % len(markers)], "color": f"C{i % 10}", "label": m if j == 0 else None}
            a.scatter(_mean([r["density"] for r in at]), acc, **kw)
            b.scatter(_mean([r["prefill_ms"] for r in at]), acc, **kw)
    a.set_xlabel("attention density (fraction of causal work)")
    b.set_xlabel("prefill ms")
    b.set_xscale("log")
    for ax in (a, b):
        ax.set_ylabel("accuracy %")
        ax.grid(alpha=0.3)
    a.legend(fontsize=7, loc="lower right")
    fig.suptitle("markers by length: " + ", ".join(f"{markers[j]}={n}" for j, n in enumerate(lengths)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_html(rows: list[dict], out: Path, *, title: str = "longattn eval") -> Path:
    """A single self-contained HTML file (plots embedded) next to its PNGs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    scored = any(r.get("correct") is not None for r in rows)
    pngs = [p for p in (heatmaps(rows, out.with_suffix(".niah.png")),
                        pareto(rows, out.with_suffix(".pareto.png")) if scored else None) if p is not None]
    env = {k: rows[0].get(k) for k in ("model", "dtype", "device", "torch", "git_sha") if rows and k in rows[0]}
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p>{html.escape(json.dumps(env))} · {len(rows)} samples</p>",
             _md_to_html(markdown(rows))]
    for p in pngs:
        data = base64.b64encode(p.read_bytes()).decode()
        parts.append(f"<p><img src='data:image/png;base64,{data}' style='max-width:100%'></p>")
    parts.append("</body></html>")
    out.write_text("\n".join(parts))
    return out


def _md_to_html(md: str) -> str:
    """The markdown tables above as HTML tables (only the subset ``markdown`` writes)."""
    out, in_table = [], False
    for line in md.splitlines():
        if line.startswith("|") and set(line) <= set("|-"):
            continue
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            tag = "th" if not in_table else "td"
            out.append(("<table>" if not in_table else "") + "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells)
                       + "</tr>")
            in_table = True
        else:
            if in_table:
                out.append("</table>")
            in_table = False
    if in_table:
        out.append("</table>")
    return "\n".join(out)
