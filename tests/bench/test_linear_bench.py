"""The linear-attention benchmark's plumbing on CPU (kernels interpreted, tiny sizes): rows carry their checks."""

from __future__ import annotations

import json

import torch

from longattn.bench import linear


def test_bench_rows_and_checks(tmp_path):
    out = tmp_path / "rows.jsonl"
    rows = linear.run([32, 64], tokens=64, heads=2, head_dim=16, dtype=torch.float32, modes=("decay",),
                      directions=("fwd",), decode_batches=(2,), out=out, device="cpu")
    assert [r["op"] for r in rows] == ["fwd", "fwd", "decode_step"]
    assert all(r["correct"] for r in rows), rows
    assert [r["batch"] for r in rows[:2]] == [2, 1]
    assert rows[0]["sdpa_cudnn_ms"] is None and "sdpa_note" in rows[0]  # cuDNN absent on CPU: noted, not hidden
    assert len(out.read_text().splitlines()) == 3 and json.loads(out.read_text().splitlines()[0])["suite"] == "linear"
    assert "crossover" in linear._table(rows)
