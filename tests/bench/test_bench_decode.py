"""The decode benchmark runs end to end on CPU (tiny shapes): rows written, checked, and bad rows refused."""

from __future__ import annotations

import json

import torch

from longattn.bench import decode as bench


def test_run_writes_checked_rows(tmp_path):
    out = tmp_path / "decode.jsonl"
    rows = bench.run([256], batches=(2,), heads=4, heads_kv=2, head_dim=32, dtype=torch.float32, page_size=16,
                     budget=64, out=out, anchors=False, device="cpu")
    assert [r["variant"] for r in rows] == ["ours_dense", "ours_paged", "ours_selected",
                                            "ours_selected_per_query_head"]
    assert all(r["correct"] and r["ms"] > 0 for r in rows)
    assert rows[0]["bytes_read"] == 2 * 2 * 2 * 256 * 32 * 4 + 2 * 2 * 4 * 32 * 4
    assert rows[2]["bytes_read"] < rows[0]["bytes_read"] and rows[2]["speedup_vs_ours_dense"] > 0
    # per query head: 4 pages of 16 each, a group of 2 reads their union: 4 to 8 distinct pages per kv head
    assert 4 <= rows[3]["union_pages_per_kv_head"] <= 8 and rows[3]["bytes_read"] >= rows[2]["bytes_read"] - 64
    assert [json.loads(line)["variant"] for line in out.read_text().splitlines()] == [r["variant"] for r in rows]
    assert "ours_selected" in bench.markdown_table(rows)


def test_wrong_results_report_no_time(tmp_path, monkeypatch):
    real = bench.decode_attention

    def broken(*args, **kwargs):
        res = real(*args, **kwargs)
        return (res[0] + 1, res[1]) if isinstance(res, tuple) else res + 1

    monkeypatch.setattr(bench, "decode_attention", broken)
    rows = bench.run([64], batches=(1,), heads=2, heads_kv=1, head_dim=16, dtype=torch.float32, page_size=16,
                     budget=32, out=tmp_path / "x.jsonl", anchors=False, device="cpu")
    assert rows and all(r["correct"] is False and r["ms"] is None and r["refused"] for r in rows)


def test_hbm_table():
    assert bench.hbm_peak_tb_s("NVIDIA H100 80GB HBM3") == 3.35
    assert bench.hbm_peak_tb_s("NVIDIA H100 PCIe") == 2.0
    assert bench.hbm_peak_tb_s("NVIDIA H200") == 4.8
    assert bench.hbm_peak_tb_s("cpu (x86_64)") is None


def test_speedups_compare_one_timing_mode(tmp_path, monkeypatch):
    """A row whose graph capture failed (timed eagerly) gets no graph-mode speed-up against a graph-timed row;
    the eager columns still compare."""
    modes = iter(["eager"] + ["cudagraph"] * 10)  # ours_dense falls back to eager, the rest replay graphs
    monkeypatch.setattr(bench, "_time", lambda calls, dev: {"ms": 1.0, "ms_eager": 2.0, "timing": next(modes)})
    rows = bench.run([64], batches=(1,), heads=2, heads_kv=1, head_dim=16, dtype=torch.float32, page_size=16,
                     budget=32, out=tmp_path / "x.jsonl", anchors=False, device="cpu")
    selected = next(r for r in rows if r["variant"] == "ours_selected")
    assert "speedup_vs_ours_dense" not in selected and selected["speedup_vs_ours_dense_eager"] == 1.0
