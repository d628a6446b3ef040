"""``longattn bench decode``: one decode step of our kernel (dense, paged, Quest-selected pages) against SDPA's
flash backend and compiled FlexAttention decoding, per batch × cache length, in one process.

Every row carries the bytes the step must read (K and V tokens it attends, q, out), the achieved bandwidth and
its fraction of the device's HBM peak. Our rows are checked against the fp64 decode oracle in the same run (on
the first sequence and two kv heads, under the tests' tolerance rule); a row that fails reports no time.
Timing, the same for every contender: ``ms`` from CUDA-graph replays of the step (a decode step is graph-captured
in serving), ``ms_eager`` from the step launched from Python, both between CUDA events; ``timing`` names the mode
of ``ms`` (eager where capture fails, with the error). Inputs rotate over enough copies that the bytes read per
timed call exceed the L2 cache several times, so the numbers are HBM numbers.
SDPA runs with ``enable_gqa=True`` (no repeated K/V); if the flash backend rejects that, with K/V repeated to
the query heads beforehand, and the row says ``sdpa_gqa: "repeat"``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from longattn.bench.read_ceiling import read_kv
from longattn.bench.timing import append_jsonl, environment, median_ms
from longattn.kernels.decode import decode_attention, group_page_union
from longattn.kernels.decode_reference import decode_reference
from longattn.kernels.page_select import page_bounds, page_scores, select_pages

HBM_TB_S = {  # peak HBM bandwidth by device-name fragment (first match wins)
    "H100 PCIe": 2.0, "H100 NVL": 3.9, "H100": 3.35, "H200": 4.8, "A100-SXM4-40GB": 1.555, "A100": 2.039,
    "L40S": 0.864, "GH200": 4.0,
}
L2_ROTATE_BYTES = 256e6  # rotate inputs until one timed call reads at least this much (H100 L2: 50 MB)
EAGER_STEPS = 10  # steps launched back to back between two CUDA events (eager timing)
GRAPH_MS = 5.0  # graph replays between two CUDA events: about this many milliseconds of work
REPS = 15  # medians over this many event pairs
CHECK_KV_HEADS = 2
FLOOR = 1e-5  # the tests' tolerance rule: error <= 2x plain low-precision error + FLOOR


def hbm_peak_tb_s(device_name: str) -> float | None:
    """Datasheet HBM bandwidth (TB/s) of a device, from its name; None when unknown."""
    for key, tb_s in HBM_TB_S.items():
        if key.lower() in device_name.lower():
            return tb_s
    return None


def _events_ms(fn: Callable[[], object], n: int, reps: int) -> float:
    """Median over ``reps`` of the CUDA-event time of ``n`` back-to-back calls of ``fn``, per call."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / n)
    return statistics.median(times)


def _time(calls: list[Callable[[], object]], device: torch.device) -> dict:
    """Time of one call (rotating over ``calls``), the same way for every contender: ``ms`` from CUDA-graph replays
    (one step = every call, captured once, replayed back to back between CUDA events: how serving engines run a
    decode step) and ``ms_eager`` from the same step launched from Python between CUDA events. If capture fails,
    ``ms`` is the eager time and the row says so."""
    def step():
        for c in calls:
            c()

    step()  # compile / autotune outside any capture
    if device.type != "cuda":
        return {"ms": median_ms(step, device) / len(calls), "timing": "wall"}
    torch.cuda.synchronize()
    eager = _events_ms(step, EAGER_STEPS, REPS) / len(calls)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(side):  # warm-up on the capture stream (allocator pools, per-stream state)
            step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            step()
        replays = max(1, math.ceil(GRAPH_MS / (eager * len(calls))))
        ms = _events_ms(graph.replay, replays, REPS) / len(calls)
    except RuntimeError as e:
        torch.cuda.synchronize()
        return {"ms": eager, "ms_eager": eager, "timing": "eager",
                "graph_error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"}
    return {"ms": ms, "ms_eager": eager, "timing": "cudagraph"}


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    inf = torch.isinf(ref)
    if bool((a[inf] != ref[inf]).any()) or bool(torch.isnan(a).any()):
        return float("inf")
    return float((a[~inf] - ref[~inf]).abs().max()) if (~inf).any() else 0.0


def _check(out: torch.Tensor, lse: torch.Tensor, q, k, v, **sel) -> dict:
    """Our output on sequence 0, kv heads 0..1 vs the fp64 oracle, under the 2x-low-precision rule."""
    hk = min(CHECK_KV_HEADS, k.shape[1])
    g = q.shape[1] // k.shape[1]
    qs, ks, vs = q[:1, : hk * g], k[:1, :hk], v[:1, :hk]
    sub = {}
    if "page_indices" in sel:  # one set per kv head, or per query head
        hs = hk * (sel["page_indices"].shape[1] // k.shape[1])
        sub = {"page_size": sel["page_size"], "page_indices": sel["page_indices"][:1, :hs],
               "page_counts": sel["page_counts"][:1, :hs]}
    with torch.no_grad():
        ref_o, ref_l = decode_reference(qs.double(), ks.double(), vs.double(), **sub)
        low_o, low_l = decode_reference(qs, ks, vs, compute_dtype=q.dtype, **sub)
    err = max(_max_err(out[:1, : hk * g], ref_o), _max_err(lse[:1, : hk * g], ref_l))
    base = max(_max_err(low_o, ref_o), _max_err(low_l, ref_l))
    return {"max_abs_err": err, "baseline_err": base, "correct": err <= 2 * base + FLOOR}


def _paged_copy(t: torch.Tensor, page_size: int, perm: torch.Tensor) -> torch.Tensor:
    """The contiguous cache [B, H, L, D] as shuffled physical pages [B·n, H, page_size, D]."""
    B, H, L, D = t.shape
    n = L // page_size
    pages = t.view(B, H, n, page_size, D).permute(0, 2, 1, 3, 4).reshape(B * n, H, page_size, D)
    out = torch.empty_like(pages)
    out[perm] = pages
    return out


def _rows_for(B: int, L: int, env: dict, *, heads: int, heads_kv: int, head_dim: int, dtype: torch.dtype,
              page_size: int, budget: int, anchors: bool, dev: torch.device) -> list[dict]:
    """All rows of one (batch, cache length): ours dense / paged / selected, SDPA flash and FlexAttention."""
    elt = torch.finfo(dtype).bits // 8
    kv_bytes_dense = 2 * B * heads_kv * L * head_dim * elt
    qo_bytes = 2 * B * heads * head_dim * elt
    copies = max(1, math.ceil(L2_ROTATE_BYTES / kv_bytes_dense)) if dev.type == "cuda" else 1
    g = torch.Generator(device=dev).manual_seed(L + B)
    sets = [tuple(torch.randn(*shape, device=dev, dtype=dtype, generator=g)
                  for shape in ((B, heads, 1, head_dim), (B, heads_kv, L, head_dim), (B, heads_kv, L, head_dim)))
            for _ in range(copies)]
    base = {"suite": "decode", "batch": B, "heads_q": heads, "heads_kv": heads_kv, "head_dim": head_dim,
            "dtype": str(dtype).removeprefix("torch."), "cache_len": L, "copies": copies}
    rows: list[dict] = []

    def add(variant: str, calls, bytes_read: float, check: dict | None = None, **extra) -> None:
        row = {**base, "variant": variant, "bytes_read": bytes_read, **extra, **(check or {})}
        try:
            timed = _time(calls, dev)
        except Exception as e:  # OOM, a backend that cannot run: recorded in the row, never dropped
            row.update(ms=None, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            return
        if check is not None and not check["correct"]:
            row.update(ms=None, refused="correctness check failed in this run", ms_unverified=timed["ms"])
        else:
            row.update(timed, tb_s=bytes_read / timed["ms"] / 1e9)
            if timed.get("ms_eager"):
                row["tb_s_eager"] = bytes_read / timed["ms_eager"] / 1e9
        rows.append(row)

    # ours, dense contiguous cache
    q0, k0, v0 = sets[0]
    out, lse = decode_attention(q0, k0, v0, impl="triton" if dev.type == "cuda" else "auto", return_lse=True)
    impl = "triton" if dev.type == "cuda" else "reference"
    add("ours_dense", [lambda s=s: decode_attention(*s, impl=impl) for s in sets], kv_bytes_dense + qo_bytes,
        _check(out, lse, q0, k0, v0))

    if dev.type == "cuda":  # the same K/V bytes streamed by a kernel that only reads them
        add("read_ceiling", [lambda s=s: read_kv(s[1], s[2]) for s in sets], kv_bytes_dense)

    # ours, paged cache (shuffled pages of page_size), same tokens
    if L % page_size == 0:
        n = L // page_size
        perm = torch.randperm(B * n, device=dev)
        table = perm.view(B, n).to(torch.int32)
        paged = [(s[0], _paged_copy(s[1], page_size, perm), _paged_copy(s[2], page_size, perm)) for s in sets]
        out, lse = decode_attention(*paged[0], block_table=table, impl=impl, return_lse=True)
        add("ours_paged", [lambda s=s: decode_attention(*s, block_table=table, impl=impl) for s in paged],
            kv_bytes_dense + qo_bytes + table.numel() * 4, _check(out, lse, q0, k0, v0), page_size=page_size)
        del paged

    # ours, Quest-selected pages within a token budget; fresh queries pick different pages for each timed call
    if budget < L:
        n_sel = budget // page_size
        sel_bytes = 2 * B * heads_kv * n_sel * page_size * head_dim * elt + qo_bytes + B * heads_kv * n_sel * 4
        n_calls = max(1, math.ceil(L2_ROTATE_BYTES / sel_bytes)) if dev.type == "cuda" else 1
        bounds = [page_bounds(ks, page_size) for _, ks, _ in sets]
        selections = []
        for i in range(n_calls):
            _, ks, vs = sets[i % len(sets)]
            qs = torch.randn(sets[0][0].shape, device=dev, dtype=dtype, generator=g)
            idx, cnt = select_pages(page_scores(qs, *bounds[i % len(sets)]), budget, page_size)
            selections.append((qs, ks, vs, idx, cnt))
        qs, ks, vs, idx, cnt = selections[0]
        mn, mx = bounds[0]
        score = _time([lambda: select_pages(page_scores(qs, mn, mx), budget, page_size)], dev)
        kw = {"page_size": page_size, "page_indices": idx, "page_counts": cnt}
        out, lse = decode_attention(qs, ks, vs, impl=impl, return_lse=True, **kw)
        calls = [lambda s=s: decode_attention(s[0], s[1], s[2], page_size=page_size, page_indices=s[3],
                                              page_counts=s[4], impl=impl) for s in selections]
        add("ours_selected", calls, sel_bytes, _check(out, lse, qs, ks, vs, **kw), page_size=page_size,
            budget_tokens=budget, select_ms=score["ms"], select_ms_eager=score.get("ms_eager"),
            select_timing=score["timing"], copies=n_calls)
        _add_per_query_head(add, sets, bounds, budget, page_size, impl, qo_bytes, g, dev)
        del bounds, selections

    if anchors and dev.type == "cuda":
        rows.extend(_anchor_rows(sets, base, kv_bytes_dense + qo_bytes, add))
    by = {r["variant"]: r for r in rows}
    for r in rows:
        r.update(env)
        peak = hbm_peak_tb_s(r["device"])
        r["hbm_peak_tb_s"] = peak
        for suffix in ("", "_eager"):
            r[f"frac_hbm_peak{suffix}"] = r[f"tb_s{suffix}"] / peak if r.get(f"tb_s{suffix}") and peak else None
    def ratio(num: str, den: str, suffix: str) -> float | None:
        """ms(num) / ms(den) in one timing mode (``ms`` counts only where both rows were timed the same way)."""
        a, b = by.get(num, {}), by.get(den, {})
        same = suffix or a.get("timing") == b.get("timing")
        return a[f"ms{suffix}"] / b[f"ms{suffix}"] if same and a.get(f"ms{suffix}") and b.get(f"ms{suffix}") else None

    for suffix in ("", "_eager"):
        pairs = [("ours_selected", "ours_dense"), ("ours_selected_per_query_head", "ours_dense")] + [
            (v, a) for v in ("ours_dense", "ours_paged") for a in ("sdpa_flash", "flex", "read_ceiling")]
        for ours, other in pairs:
            if (x := ratio(other, ours, suffix)) is not None:
                by[ours][f"speedup_vs_{other}{suffix}"] = x
    return rows


def _add_per_query_head(add, sets, bounds, budget: int, page_size: int, impl: str, qo_bytes: int, g,
                        dev: torch.device) -> None:
    """Quest's own form: each query head its own ``budget`` of pages (bounds of its kv head, per-head scores); the
    kernel reads the group's union once, so the bytes are the union's, averaged over the timed selections."""
    q0, k0, _ = sets[0]
    B, Hq, _, D = q0.shape
    group = Hq // k0.shape[1]
    elt = k0.element_size()
    selections, union_pages = [], []
    n_calls = max(1, math.ceil(L2_ROTATE_BYTES / (2 * B * k0.shape[1] * budget * D * elt))) \
        if dev.type == "cuda" else 1
    for i in range(n_calls):
        _, ks, vs = sets[i % len(sets)]
        qs = torch.randn(q0.shape, device=dev, dtype=q0.dtype, generator=g)
        mn, mx = bounds[i % len(sets)]
        idx, cnt = select_pages(page_scores(qs, mn, mx, reduce="none"), budget, page_size)  # a row per query head
        union_pages.append(float(group_page_union(idx, cnt, group, mn.shape[2])[1].sum()))
        selections.append((qs, ks, vs, idx, cnt))
    pages_read = statistics.mean(union_pages)
    qs, ks, vs, idx, cnt = selections[0]
    kw = {"page_size": page_size, "page_indices": idx, "page_counts": cnt}
    out, lse = decode_attention(qs, ks, vs, impl=impl, return_lse=True, **kw)
    calls = [lambda s=s: decode_attention(s[0], s[1], s[2], page_size=page_size, page_indices=s[3],
                                          page_counts=s[4], impl=impl) for s in selections]
    add("ours_selected_per_query_head", calls, 2 * pages_read * page_size * D * elt + qo_bytes + idx.numel() * 4,
        _check(out, lse, qs, ks, vs, **kw), page_size=page_size, budget_tokens=budget,
        union_pages_per_kv_head=pages_read / (B * k0.shape[1]), copies=n_calls)


def _anchor_rows(sets, base, bytes_read, add) -> list[dict]:
    """SDPA flash backend and compiled FlexAttention decoding on the same dense caches (rows added via ``add``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, v, enable_gqa=True)

    gqa_mode = "enable_gqa"
    q, k, v = sets[0]
    try:
        flash(q, k, v)
        calls = [lambda s=s: flash(*s) for s in sets]
    except RuntimeError:  # flash without native GQA: repeat K/V outside the timed region
        gqa_mode = "repeat"
        g = q.shape[1] // k.shape[1]
        rep = [(s[0], s[1].repeat_interleave(g, 1), s[2].repeat_interleave(g, 1)) for s in sets[:1]]
        calls = [lambda s=s: flash(*s) for s in rep]
    add("sdpa_flash", calls, bytes_read, sdpa_gqa=gqa_mode, copies=len(calls))
    del calls

    L = k.shape[2]
    torch._dynamo.reset()  # fresh compile: earlier graphs must not push dynamo into its recompile limit
    flex = torch.compile(flex_attention, dynamic=False)
    try:
        bm = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < L, None, None, 1, L, device=k.device)
    except (RuntimeError, torch.OutOfMemoryError) as e:
        return [{**base, "variant": "flex", "bytes_read": bytes_read, "ms": None,
                 "error": str(e).splitlines()[0][:200]}]
    add("flex", [lambda s=s: flex(*s, block_mask=bm, enable_gqa=True) for s in sets], bytes_read)
    return []


def run(lengths: list[int], *, batches: tuple[int, ...] = (1, 8), heads: int = 32, heads_kv: int = 8,
        head_dim: int = 128, dtype: torch.dtype = torch.bfloat16, page_size: int = 64, budget: int = 4096,
        out: Path, anchors: bool = True, device: str | None = None) -> list[dict]:
    """Benchmark one decode step per (batch, length); append rows to ``out`` (JSONL) and return them."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = environment(dev)
    rows: list[dict] = []
    for B in batches:
        for L in lengths:
            try:
                new = _rows_for(B, L, env, heads=heads, heads_kv=heads_kv, head_dim=head_dim, dtype=dtype,
                                page_size=page_size, budget=budget, anchors=anchors, dev=dev)
            except Exception as e:  # OOM or a failure before any row: one row says so, the sweep goes on
                new = [{"suite": "decode", "variant": "all", "batch": B, "cache_len": L, "ms": None,
                        "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}", **env}]
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            for r in new:
                append_jsonl(out, r)
            rows.extend(new)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """One line per row: variant, shape, graph and eager time, bandwidth fraction of peak, correctness, speed-ups."""
    def num(r: dict, key: str, fmt: str, scale: float = 1.0) -> str:
        return format(r[key] * scale, fmt) if r.get(key) else "-"

    lines = ["| variant | B | cache | µs graph | % HBM | µs eager | % HBM eager | correct | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r.get("error") or r.get("refused") or r.get("graph_error") or ""
        for key in ("speedup_vs_sdpa_flash", "speedup_vs_flex", "speedup_vs_read_ceiling", "speedup_vs_ours_dense"):
            if r.get(key):
                note += f" {key.removeprefix('speedup_')}={r[key]:.2f}x"
                if r.get(f"{key}_eager"):
                    note += f" (eager {r[f'{key}_eager']:.2f}x)"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['cache_len']} | {num(r, 'ms', '.1f', 1e3)} | "
                     f"{num(r, 'frac_hbm_peak', '.0f', 100)} | {num(r, 'ms_eager', '.1f', 1e3)} | "
                     f"{num(r, 'frac_hbm_peak_eager', '.0f', 100)} | {r.get('correct', '')} | {note.strip()} |")
    return "\n".join(lines)


def add_cli(bench_subparsers) -> None:
    """Add ``decode`` to ``longattn bench``'s sub-parsers."""
    p = bench_subparsers.add_parser("decode", help="one decode step: ours dense/paged/selected vs SDPA, Flex")
    p.add_argument("--lengths", default="8k,16k,32k,64k,128k,256k,512k")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--heads-kv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--budget", default="4k", help="selected-page budget in tokens")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto")
    p.add_argument("--no-anchors", action="store_true", help="skip SDPA / FlexAttention")
    p.add_argument("--out", default=None, help="JSONL file to append rows to")
    p.set_defaults(fn=cmd_bench_decode)


def _ints(text: str) -> list[int]:
    return [int(x[:-1]) * 1024 if x.lower().endswith("k") else int(x) for x in text.replace(" ", "").split(",")]


def cmd_bench_decode(args) -> int:
    from datetime import datetime, timezone

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    out = Path(args.out or f"benchmarks/results/decode-{'gpu' if on_gpu else 'cpu'}-{stamp}.jsonl")
    rows = run(_ints(args.lengths), batches=tuple(_ints(args.batches)), heads=args.heads, heads_kv=args.heads_kv,
               head_dim=args.head_dim, dtype=dtypes[args.dtype], page_size=args.page_size,
               budget=_ints(args.budget)[0], out=out, anchors=not args.no_anchors,
               device="cuda" if on_gpu else "cpu")
    print(markdown_table(rows))
    print(f"rows: {out}")
    return 0


if __name__ == "__main__":  # `python -m longattn.bench.decode ...` until the CLI wires the sub-command
    import argparse

    parser = argparse.ArgumentParser(prog="longattn bench")
    add_cli(parser.add_subparsers(dest="suite", required=True))
    cli_args = parser.parse_args()
    raise SystemExit(cli_args.fn(cli_args))
