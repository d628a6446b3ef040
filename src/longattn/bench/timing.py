"""Timing and run metadata shared by benchmarks: median of repeated runs (CUDA events on GPU)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from longattn.jsonl import open_append


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 5, reps: int = 20) -> float:
    """Median wall time of ``fn`` in milliseconds after warm-up; CUDA events (triton's do_bench) on GPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated while running ``fn`` once (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated(device))


def environment(device: torch.device) -> dict[str, str]:
    """Device name, library versions and git sha: stamped on every benchmark row."""
    import triton

    sha = os.environ.get("LONGATTN_GIT_SHA", "")
    try:
        sha = sha or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'cpu'})"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__, "git_sha": sha,
            "host_cores": str(os.cpu_count())}


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row (one JSON object per line); the file is created with its folder."""
    with open_append(path) as f:
        f.write(json.dumps(row) + "\n")
