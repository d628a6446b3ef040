"""Where a 128k prefill of the random-weight Llama-3-8B shape spends its GPU time: a few layers of the model under
torch.profiler, dense cuDNN and each method given, kernels grouped by name into attention (ours, cuDNN, flash),
GEMM and other (a method's estimation kernels land in other), per layer. Answers how much of the model is attention
(the ceiling of any sparse method's speed-up) and what a patched layer costs beyond its attention kernel.

Usage: python benchmarks/profile_model.py [SEQ] [LAYERS] [METHODS]   e.g. 131072 4 streaming,minference_block,dhsa
"""

import sys
import time
from collections import defaultdict

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from longattn.bench.model import random_model
from longattn.eval.methods import applied, parse_method

S = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
LAYERS = int(sys.argv[2]) if len(sys.argv) > 2 else 4
METHODS = sys.argv[3].split(",") if len(sys.argv) > 3 else ["streaming", "minference_block"]
ATTN = ("fmha", "flash", "cudnn", "_fwd_tma_kernel", "_fwd_kernel", "attention", "sm90_xmma", "cutlass3x")
GEMM = ("gemm", "Gemm", "sm90_xmma_gemm", "nvjet", "cublas")


def _group(name: str) -> str:
    if any(g in name for g in GEMM) and "fmha" not in name:
        return "gemm"
    if any(a in name for a in ATTN):
        return "attention"
    return "other"


def _profile(model, ids) -> None:
    def once():
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)
    once()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    once()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        once()
        torch.cuda.synchronize()
    groups, top = defaultdict(float), defaultdict(float)
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            groups[_group(ev.key)] += ev.device_time_total / 1e3
            top[ev.key[:60]] += ev.device_time_total / 1e3
    busy = sum(groups.values())
    print(f"  wall {wall:.1f} ms ({wall / LAYERS:.2f} per layer), GPU busy {busy:.1f} ms; "
          + ", ".join(f"{g} {ms:.1f} ({ms / LAYERS:.2f}/layer)" for g, ms in sorted(groups.items())), flush=True)
    for name, ms in sorted(top.items(), key=lambda x: -x[1])[:8]:
        print(f"    {ms:9.2f} ms  {name}", flush=True)


def main() -> None:
    model = random_model("llama3-8b", torch.device("cuda"), torch.bfloat16, S, LAYERS)
    ids = torch.randint(0, model.config.vocab_size, (1, S), device="cuda")
    print(f"== dense cuDNN, S={S}, {LAYERS} layers", flush=True)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        _profile(model, ids)
    for m in METHODS:
        print(f"== {m}", flush=True)
        with applied(model, parse_method(m)) as handle:
            _profile(model, ids)
            densities = handle.state.densities
            if densities:
                print(f"  block density {sum(densities) / len(densities):.4f} (mean of {len(densities)} calls)",
                      flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
