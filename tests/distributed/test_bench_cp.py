"""`longattn bench cp` launched the way users launch it (torchrun, 2 CPU processes on gloo): one row per method and
length, each checked against one device's attention over the whole sequence."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.distributed.launch import free_port


def test_bench_cp_under_torchrun(tmp_path):
    out = tmp_path / "cp.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "longattn.cli", "bench", "cp", "--lengths", "64", "--heads", "4", "--heads-kv",
           "2", "--head-dim", "16", "--dtype", "fp32", "--reps", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["ring", "ring_contiguous", "ulysses", "hybrid"]
    for r in rows:
        assert r["world"] == 2 and r["backend"] == "gloo" and r["seq_local"] == 32
        assert r["max_abs_err"] < 1e-5 and r["ms_fwd"] > 0 and r["ms_fwd_bwd"] > 0
