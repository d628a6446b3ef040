"""`longattn bench kernels` on CPU at toy sizes: one JSONL row per (pattern, length, direction), each checked
against the reference, with the anchors and the kernel that ran named."""

from __future__ import annotations

import json

import torch

from longattn.bench import kernels


def test_bench_kernels_rows(tmp_path):
    out = tmp_path / "rows.jsonl"
    rows = kernels.run(["causal", "sliding_window"], [300], directions=("fwd", "bwd"), heads=2, head_dim=32,
                       dtype=torch.float32, block=64, out=out, device="cpu")
    assert [(r["pattern"], r["op"]) for r in rows] == [("causal", "fwd"), ("causal", "bwd"),
                                                        ("sliding_window", "fwd"), ("sliding_window", "bwd")]
    assert [json.loads(line) for line in out.read_text().splitlines()] == json.loads(json.dumps(rows))
    for r in rows:
        assert r["correct"] is True and r["max_abs_err"] < 1e-4
        assert r["impl"] == "gather" and r["fwd_kernel"] is None  # no GPU kernel ran
        assert r["ms"] > 0 and r["density_vs_causal"] > 0 and r["sdpa_math_causal_ms"] > 0  # the CPU anchor
