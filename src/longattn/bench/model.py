"""``longattn bench model``: prefill time of a randomly initialised model of a real shape (Llama-3-8B by default),
dense SDPA (cuDNN and flash backends) against each sparse prefill method patched in with ``longattn.patch``, in one
process. Weights are random: prefill time does not depend on their values; the methods' selection does depend on
q/k statistics, so every row also reports the density the method chose."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from longattn.bench.timing import append_jsonl, environment

SHAPES = {  # (layers, hidden, heads, kv heads, intermediate, vocab, rope theta)
    "llama3-8b": (32, 4096, 32, 8, 14336, 128256, 500000.0),
    "qwen2-7b": (28, 3584, 28, 4, 18944, 152064, 1000000.0),
    "smollm2-135m": (30, 576, 9, 3, 1536, 49152, 100000.0),
}


def random_model(shape: str, device: torch.device, dtype: torch.dtype, max_len: int, layers: int | None = None):
    """A Llama-architecture model of ``shape`` with random weights, built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"shape: expected one of {', '.join(SHAPES)}, got {shape!r}")
    n_layers, hidden, heads, kv_heads, inter, vocab, theta = SHAPES[shape]
    cfg = LlamaConfig(num_hidden_layers=layers or n_layers, hidden_size=hidden, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab,
                      max_position_embeddings=max_len, rope_theta=theta)
    cfg._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def _time_prefill(model, ids: torch.Tensor, reps: int) -> tuple[list[float], int]:
    """Wall times (ms) of ``reps`` prefills after one warm-up (which also autotunes kernels), and the peak bytes."""
    def once() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    once()
    torch.cuda.reset_peak_memory_stats()
    times = [once() for _ in range(reps)]
    return times, int(torch.cuda.max_memory_allocated())


def run(methods: list[str], lengths: list[int], *, shape: str = "llama3-8b", reps: int = 3, layers: int | None = None,
        out: Path, device: str = "cuda") -> list[dict]:
    """One row per (length, method): median prefill ms, speed-up vs dense cuDNN, density chosen by the method."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longattn.eval.methods import applied, parse_method

    if not torch.cuda.is_available():
        raise SystemExit("bench model: needs a CUDA device (prefill of an 8B-shaped model)")
    specs = [parse_method(m) for m in methods]
    dev = torch.device(device)
    model = random_model(shape, dev, torch.bfloat16, max(lengths), layers)
    env = environment(dev)
    rows = []
    for n in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=dev, generator=torch.Generator(dev)
                            .manual_seed(n))
        base = None  # the first dense backend that runs (cuDNN) is the baseline of every speed-up at this length
        for label, backend in (("dense-cudnn", SDPBackend.CUDNN_ATTENTION),
                               ("dense-flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    times, peak = _time_prefill(model, ids, reps)
            except RuntimeError as e:  # a backend that cannot take the shape is recorded, not fatal
                rows.append(_row(env, shape, n, label, {}, None, None, None, 1.0, str(e)[:200], out))
                continue
            ms = statistics.median(times)
            base = base or ms
            rows.append(_row(env, shape, n, label, {}, ms, base, peak, 1.0, None, out))
        for spec in specs:
            try:
                with applied(model, spec) as handle:
                    times, peak = _time_prefill(model, ids, reps)
                    density = statistics.mean(handle.state.densities) if handle.state.densities else 1.0
                ms = statistics.median(times)
                rows.append(_row(env, shape, n, spec.label, spec.knobs, ms, base, peak, density, None, out))
            except (RuntimeError, ValueError) as e:
                rows.append(_row(env, shape, n, spec.label, spec.knobs, None, base, None, None, str(e)[:300], out))
            torch.cuda.empty_cache()
    return rows


def _row(env, shape, n, method, knobs, ms, base, peak, density, error, out) -> dict:
    row = {"bench": "model", "shape": shape, "seq": n, "method": method, "config": knobs,
           "prefill_ms": None if ms is None else round(ms, 1),
           "speedup_vs_dense": None if ms is None or base is None else round(base / ms, 3),
           "density": density, "peak_gb": None if peak is None else round(peak / 2**30, 2), "error": error} | env
    append_jsonl(out, row)
    print(f"{shape} {n:>7} {method:<40} {row['prefill_ms']} ms  x{row['speedup_vs_dense']}  density {density}"
          + (f"  ERROR {error}" if error else ""), flush=True)
    return row
