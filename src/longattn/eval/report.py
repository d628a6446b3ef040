"""Turn eval rows into tables (markdown / HTML) and plots: NIAH heatmaps (depth × length) per method, accuracy vs
density and vs prefill time, so accuracy always sits beside the speed it buys. Rows run with a decode policy are
named ``method + decode`` and get their own table (accuracy, compression, KV read fraction, decode ms/token) and
an accuracy-vs-compression plot per task."""

from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from pathlib import Path

NEEDLE_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
AGNOSTIC = " (question-agnostic)"  # marks a decode policy's rows of the question-agnostic setting


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


def _decode(row: dict) -> str:
    """The decode policy's label (rows written before decode policies were evaluated ran on the dense cache), marked
    when it ran question-agnostic (its own entry in every table and plot)."""
    return row.get("decode", "dense") + _setting_mark(row)


def _policy(row: dict) -> str:
    """The policy's name without its knobs, kept apart by setting: one plot series each."""
    return row.get("decode", "dense").split(":")[0] + _setting_mark(row)


def _setting_mark(row: dict) -> str:
    return AGNOSTIC if row.get("kv_setting") == "agnostic" else ""


def _name(row: dict) -> str:
    """The row's method, with its decode policy when that is not the dense cache."""
    return row["method"] if _decode(row) == "dense" else f"{row['method']} + {_decode(row)}"


def _methods(rows: list[dict]) -> list[str]:
    """Dense first, then the others in order of first appearance."""
    seen = list(dict.fromkeys(_name(r) for r in rows))
    return sorted(seen, key=lambda m: m != "dense")


def _mean_of(rows: list[dict], key: str) -> float | None:
    """Mean of a field over the rows that have it (None when none do)."""
    xs = [r[key] for r in rows if r.get(key) is not None]
    return sum(xs) / len(xs) if xs else None


def has_decode(rows: list[dict]) -> bool:
    """Whether any row ran with a decode policy (not the dense cache)."""
    return any(_decode(r) != "dense" for r in rows)


def summary(rows: list[dict]) -> list[dict]:
    """One row per (method, decode policy): accuracy (%) per length and overall, mean density, mean prefill ms per
    length; mean compression, KV read fraction, decode ms/token and tokens/s where the rows carry them."""
    rows = [r for r in rows if r.get("correct") is not None]
    lengths = sorted({r["length"] for r in rows})
    out = []
    for m in _methods(rows):
        mine = [r for r in rows if _name(r) == m]
        entry = {"method": m, "prefill": mine[0]["method"], "decode": _decode(mine[0]), "samples": len(mine),
                 "accuracy": 100 * _mean([r["correct"] for r in mine]), "density": _mean([r["density"] for r in mine])}
        for key in ("compression", "kv_read_fraction", "decode_ms_per_token", "tokens_per_s", "kv_bytes_kept"):
            entry[key] = _mean_of(mine, key)
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
                    at = [r["correct"] for r in rows if _name(r) == m and r["length"] == n and r["task"] == t]
                    cells.append(f"{100 * _mean(at):.0f}" if at else "–")
                lines.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
    if has_decode(rows):
        lines += ["", decode_table(rows)]
    return "\n".join(lines) + ("\n\n" + _perplexity_table(ppl) if ppl else "")


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def decode_table(rows: list[dict]) -> str:
    """Per (method, decode policy): accuracy, compression (dense KV bytes / kept KV bytes), fraction of the kept
    KV a step reads (query-aware policies), kept KV in KiB, decode ms/token, tokens/s, samples."""
    lines = ["| method | decode | acc % | compression | kv read | kept KiB | decode ms/token | tokens/s | samples |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in summary(rows):
        kib = None if e["kv_bytes_kept"] is None else e["kv_bytes_kept"] / 1024
        lines.append(f"| {e['prefill']} | {e['decode']} | {e['accuracy']:.1f} | {_fmt(e['compression'], '.2f')}x | "
                     f"{_fmt(e['kv_read_fraction'], '.2f')} | {_fmt(kib, '.1f')} | "
                     f"{_fmt(e['decode_ms_per_token'], '.2f')} | {_fmt(e['tokens_per_s'], '.1f')} | {e['samples']} |")
    return "\n".join(lines)


def _perplexity_table(rows: list[dict]) -> str:
    lengths = sorted({r["length"] for r in rows})
    lines = ["| method | " + " | ".join(f"ppl @ {n} (density)" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for m in _methods(rows):
        cells = []
        for n in lengths:
            at = [r for r in rows if _name(r) == m and r["length"] == n]
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
            if _name(r) == m:
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
            at = [r for r in rows if _name(r) == m and r["length"] == n]
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


def compression_plot(rows: list[dict], path: Path) -> Path | None:
    """One panel per task: accuracy vs KV compression (dense bytes / kept bytes), one line per (prefill method,
    decode policy) through its configurations (points labelled with their budget), the dense cache as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("correct") is not None and r.get("compression") is not None]
    if not has_decode(rows):
        return None
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cols = min(3, len(tasks))
    n_rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.6 * cols, 3.6 * n_rows), squeeze=False)
    series = list(dict.fromkeys((r["method"], _policy(r)) for r in rows))
    for ax, task in zip(axes.flat, tasks, strict=False):
        mine = [r for r in rows if r["task"] == task]
        for i, (method, policy) in enumerate(series):
            specs = list(dict.fromkeys(_decode(r) for r in mine if r["method"] == method and _policy(r) == policy))
            points = []
            for spec in specs:
                at = [r for r in mine if r["method"] == method and _decode(r) == spec]
                budget = at[0].get("decode_config", {}).get("budget")
                points.append((_mean([r["compression"] for r in at]), 100 * _mean([r["correct"] for r in at]),
                               budget))
            if not points:
                continue
            points.sort()
            label = method if policy == "dense" else f"{method} + {policy}"
            kw = {"color": f"C{i % 10}", "label": label}
            if policy == "dense":
                ax.scatter([p[0] for p in points], [p[1] for p in points], marker="*", s=120, **kw)
            else:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", **kw)
            for x, y, budget in points:
                if budget is not None:
                    ax.annotate(str(budget), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
        ax.set_xscale("log", base=2)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("KV compression (dense bytes / kept bytes)")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower left")
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_html(rows: list[dict], out: Path, *, title: str = "longattn eval") -> Path:
    """A single self-contained HTML file (plots embedded) next to its PNGs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    scored = any(r.get("correct") is not None for r in rows)
    pngs = [p for p in (heatmaps(rows, out.with_suffix(".niah.png")),
                        pareto(rows, out.with_suffix(".pareto.png")) if scored else None,
                        compression_plot(rows, out.with_suffix(".compression.png")) if scored else None)
            if p is not None]
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
