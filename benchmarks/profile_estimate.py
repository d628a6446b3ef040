"""What a prefill method's estimation (q, k -> BlockSparse) costs at one layer of the Llama-3-8B shape: wall time,
GPU busy time (the gap is host work the GPU waits on: syncs, Python), the heaviest host and device ops, and the
source lines that make the host wait on the device (torch's sync debug mode).

Usage: python benchmarks/profile_estimate.py [SEQ] [METHODS]   e.g. 131072 hip,minference_block
"""

import collections
import sys
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from longattn.eval.methods import parse_method
from longattn.methods.registry import get

S = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
METHODS = sys.argv[2].split(",") if len(sys.argv) > 2 else ["hip"]


def _sync_sites(method, q, k) -> collections.Counter:
    """Source lines (file:line) of the ops that synchronised with the device while ``method`` estimated and the
    patch recorded the mask's density (what a patched layer does before its attention kernel)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            method.estimate(q, k).mask_density()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return collections.Counter(f"{w.filename.split('/src/')[-1]}:{w.lineno}" for w in caught
                               if "synchroniz" in str(w.message))


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    for spec in METHODS:
        parsed = parse_method(spec)
        method = get(parsed.name).factory(**parsed.knobs)
        method.estimate(q, k)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            method.estimate(q, k)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 3 * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            method.estimate(q, k)
            torch.cuda.synchronize()
        print(f"== {spec}: host waits (line: count)", flush=True)
        for where, count in _sync_sites(method, q, k).most_common():
            print(f"    {where}: {count}", flush=True)
        events = prof.key_averages()
        busy = sum(e.self_device_time_total for e in events) / 1e3
        print(f"== {spec}: wall {wall:.2f} ms, GPU busy {busy:.2f} ms", flush=True)
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50), flush=True)
        print(events.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=50), flush=True)


if __name__ == "__main__":
    main()
