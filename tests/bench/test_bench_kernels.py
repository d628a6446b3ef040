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
        assert (r["max_grad_rel_err"] < 1e-4) if r["op"] == "bwd" else r["max_grad_rel_err"] is None
        assert r["impl"] == "gather" and r["fwd_kernel"] is None and r["bwd_kernel"] is None  # no GPU kernel ran
        assert r["ms"] > 0 and r["density_vs_causal"] > 0 and r["sdpa_math_causal_ms"] > 0  # the CPU anchor


def test_bench_kernels_resumes(tmp_path, monkeypatch):
    """A rerun into the same file measures only the missing cases; a torn last line is ignored; another commit
    measures again."""
    out = tmp_path / "rows.jsonl"
    args = dict(heads=2, head_dim=32, dtype=torch.float32, block=64, out=out, device="cpu", anchors=False)
    first = kernels.run(["causal"], [200], directions=("fwd",), **args)
    with out.open("a") as f:
        f.write('{"suite": "kernels", "op": "bw')  # a run killed mid-write
    calls = []
    real = kernels._max_err_vs_reference
    monkeypatch.setattr(kernels, "_max_err_vs_reference", lambda *a: calls.append(a) or real(*a))
    again = kernels.run(["causal"], [200], directions=("fwd", "bwd"), **args)
    assert again[0] == first[0] and again[1]["op"] == "bwd" and len(calls) == 1  # only the bwd case ran
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["op"] == "bwd"
    monkeypatch.setenv("LONGATTN_GIT_SHA", "another")
    assert len(kernels.run(["causal"], [200], directions=("fwd",), **args)) == 1 and len(calls) == 2


def test_bench_kernels_backward_row_fails_on_wrong_gradients(tmp_path, monkeypatch):
    """A backward row is correct only when its gradients match the reference too, not just the forward output."""
    monkeypatch.setattr(kernels, "_max_grad_err_vs_reference", lambda *a: 0.5)
    rows = kernels.run(["causal"], [200], directions=("fwd", "bwd"), heads=2, head_dim=32, dtype=torch.float32,
                       block=64, out=tmp_path / "rows.jsonl", device="cpu", anchors=False)
    assert [r["correct"] for r in rows] == [True, False] and rows[1]["max_grad_rel_err"] == 0.5
