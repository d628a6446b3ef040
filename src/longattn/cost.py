"""``longattn cost``: an analytic deployment model — what a sparse-prefill density and a KV-cache compression buy.

From a model's shape, a context length, a batch and a GPU (HBM size, bandwidth, dense bf16 rate) it gives the
prefill time (matmul + attention FLOPs at an efficiency factor), the decode time per step (weights + KV cache
read once at a fraction of the bandwidth, or the step's FLOPs if larger), the KV bytes per request and how many
requests fit in HBM beside the weights. Pure arithmetic: nothing runs on a GPU. GB means 1e9 bytes.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

DEFAULT_MFU = 0.5  # fraction of peak matmul rate a long prefill reaches (flash attention + GEMMs)
DEFAULT_BW_EFFICIENCY = 0.8  # fraction of HBM bandwidth a decode step reaches


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that set its cost."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False

    def layer_params(self) -> int:
        """Attention (q, k, v, o projections) and gated MLP (gate, up, down) weights of one layer."""
        attn = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return attn + 3 * self.hidden * self.intermediate

    def matmul_params(self) -> int:
        """Weights every token multiplies: all layers plus the LM head (norms and biases are negligible)."""
        return self.layers * self.layer_params() + self.vocab * self.hidden

    def total_params(self) -> int:
        """Resident weights: the matmul weights plus an input embedding unless it is tied to the LM head."""
        return self.matmul_params() + (0 if self.tied_embeddings else self.vocab * self.hidden)


@dataclass(frozen=True)
class GPUSpec:
    name: str
    hbm_gb: float
    tb_s: float
    bf16_tflops: float  # dense (no 2:4 sparsity)


GPUS: dict[str, GPUSpec] = {
    "h100": GPUSpec("H100 SXM", 80, 3.35, 989),
    "h100-pcie": GPUSpec("H100 PCIe", 80, 2.0, 756),
    "h200": GPUSpec("H200 SXM", 141, 4.8, 989),
    "a100": GPUSpec("A100 SXM 80GB", 80, 2.039, 312),
}

PRESETS: dict[str, ModelShape] = {
    "llama3-8b": ModelShape("llama3-8b", 32, 4096, 32, 8, 128, 14336, 128256),
    "llama3-70b": ModelShape("llama3-70b", 80, 8192, 64, 8, 128, 28672, 128256),
    "qwen2-7b": ModelShape("qwen2-7b", 28, 3584, 28, 4, 128, 18944, 152064),
    "smollm2-135m": ModelShape("smollm2-135m", 30, 576, 9, 3, 64, 1536, 49152, tied_embeddings=True),
}

_CONFIG_KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
                "intermediate": "intermediate_size", "vocab": "vocab_size"}


def model_shape(config: object, name: str | None = None) -> ModelShape:
    """A ModelShape from a preset name, a transformers config object or a config dict (config.json keys)."""
    if isinstance(config, ModelShape):
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"model: got {config!r}, expected one of {sorted(PRESETS)} or a config")
        return PRESETS[config]
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    missing = [v for v in _CONFIG_KEYS.values() if get(v) is None]
    if missing:
        raise ValueError(f"config: missing {missing}; expected a decoder config with {list(_CONFIG_KEYS.values())}")
    vals = {k: int(get(v)) for k, v in _CONFIG_KEYS.items()}
    kv_heads = int(get("num_key_value_heads") or vals["heads"])
    head_dim = int(get("head_dim") or vals["hidden"] // vals["heads"])
    label = name or str(get("name_or_path", None) or get("_name_or_path", None) or get("model_type", "model"))
    return ModelShape(label, kv_heads=kv_heads, head_dim=head_dim,
                      tied_embeddings=bool(get("tie_word_embeddings", False)), **vals)


@dataclass(frozen=True)
class Cost:
    """One deployment estimate; times in seconds, sizes in bytes."""

    model: str
    gpu: str
    context: int
    batch: int
    density: float
    kv_keep: float
    prefill_flops: float
    prefill_s: float
    decode_step_s: float
    decode_bytes: float
    kv_bytes_per_request: float
    weight_bytes: float
    max_concurrent: int


def _check_fraction(name: str, x: float) -> float:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not 0 < x <= 1:
        raise ValueError(f"{name}: got {x!r}, expected a fraction in (0, 1]")
    return float(x)


def _check_positive(name: str, x: float) -> float:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not x > 0 or math.isinf(x):
        raise ValueError(f"{name}: got {x!r}, expected a positive finite number")
    return float(x)


def estimate(model: object, context: int, *, batch: int = 1, gpu: str | GPUSpec = "h100", density: float = 1.0,
             kv_keep: float = 1.0, kv_bytes: float = 2.0, weight_bytes: float = 2.0, mfu: float = DEFAULT_MFU,
             bw_efficiency: float = DEFAULT_BW_EFFICIENCY) -> Cost:
    """Prefill time, decode step time, KV bytes and concurrency of ``model`` at ``context`` tokens.

    density: fraction of the causal attention FLOPs a sparse prefill keeps. kv_keep: fraction of the KV cache a
    decode policy keeps (and reads); kv_bytes: bytes per cached element (2 for bf16, 1 for int8/fp8, 0.5 int4).
    """
    shape = model_shape(model)
    spec = GPUS.get(gpu) if isinstance(gpu, str) else gpu
    if spec is None:
        raise ValueError(f"gpu: got {gpu!r}, expected one of {sorted(GPUS)} or a GPUSpec")
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context: got {context!r}, expected a positive number of tokens")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: got {batch!r}, expected a positive int")
    density, kv_keep = _check_fraction("density", density), _check_fraction("kv_keep", kv_keep)
    mfu, bw_efficiency = _check_fraction("mfu", mfu), _check_fraction("bw_efficiency", bw_efficiency)
    kv_bytes, weight_bytes = _check_positive("kv_bytes", kv_bytes), _check_positive("weight_bytes", weight_bytes)

    attn_width = shape.layers * shape.heads * shape.head_dim
    causal_pairs = context * (context + 1) / 2
    prefill_flops = batch * (2.0 * shape.matmul_params() * context + 4.0 * attn_width * causal_pairs * density)
    peak = spec.bf16_tflops * 1e12
    kv_per_request = 2.0 * shape.layers * shape.kv_heads * shape.head_dim * context * kv_keep * kv_bytes
    decode_bytes = shape.matmul_params() * weight_bytes + batch * kv_per_request
    decode_flops = batch * (2.0 * shape.matmul_params() + 4.0 * attn_width * context * kv_keep)
    decode_s = max(decode_bytes / (spec.tb_s * 1e12 * bw_efficiency), decode_flops / (peak * mfu))
    weights = shape.total_params() * weight_bytes
    free = spec.hbm_gb * 1e9 - weights
    return Cost(shape.name, spec.name, context, batch, density, kv_keep, prefill_flops, prefill_flops / (peak * mfu),
                decode_s, decode_bytes, kv_per_request, weights, max(0, math.floor(free / kv_per_request)))


def _tokens(text: str) -> int:
    t = text.strip().lower()
    try:
        return int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a token count like 4096 or 128k, got {text!r}") from e


def format_table(dense: Cost, method: Cost) -> str:
    """Dense vs method side by side; "gain" > 1 means the method is better (less time or memory, more of the rest)."""
    rows = [("prefill", dense.prefill_s * 1e3, method.prefill_s * 1e3, "ms", False),
            ("decode step", dense.decode_step_s * 1e3, method.decode_step_s * 1e3, "ms", False),
            ("decode tokens/s (batch)", dense.batch / dense.decode_step_s, method.batch / method.decode_step_s, "",
             True),
            ("KV per request", dense.kv_bytes_per_request / 1e9, method.kv_bytes_per_request / 1e9, "GB", False),
            ("weights", dense.weight_bytes / 1e9, method.weight_bytes / 1e9, "GB", False),
            ("max concurrent requests", dense.max_concurrent, method.max_concurrent, "", True)]
    head = (f"{method.model} on {method.gpu}, context {method.context}, batch {method.batch}; method: density "
            f"{method.density:g}, kv_keep {method.kv_keep:g}")
    lines = [head, f"{'':26}{'dense':>14}{'method':>14}{'gain':>9}"]
    for label, d, m, unit, higher_better in rows:
        num, den = (m, d) if higher_better else (d, m)
        gain = f"{num / den:8.2f}x" if den else "        -"
        lines.append(f"{label + (' (' + unit + ')' if unit else ''):26}{d:14.4g}{m:14.4g}{gain}")
    return "\n".join(lines)


def cmd_cost(args: argparse.Namespace) -> int:
    model = args.model
    if Path(model).suffix == ".json":
        model = model_shape(json.loads(Path(model).read_text()), name=Path(model).stem)
    spec = GPUS[args.gpu]
    spec = replace(spec, **{k: v for k, v in (("hbm_gb", args.hbm_gb), ("tb_s", args.tb_s),
                                                 ("bf16_tflops", args.tflops)) if v is not None})
    common = dict(batch=args.batch, gpu=spec, kv_bytes=2.0, weight_bytes=args.weight_bytes, mfu=args.mfu,
                  bw_efficiency=args.bw_efficiency)
    try:
        dense = estimate(model, args.context, **common)
        method = estimate(model, args.context, density=args.density, kv_keep=args.kv_keep,
                          **{**common, "kv_bytes": args.kv_bytes})
    except ValueError as e:
        raise SystemExit(f"longattn cost: {e}") from e
    print(format_table(dense, method))
    if method.max_concurrent == 0:
        print(f"note: the weights ({method.weight_bytes / 1e9:.1f} GB) leave no room for one request's KV cache "
              f"in {spec.hbm_gb:g} GB (try --weight-bytes 1 or a larger GPU)")
    print(f"assumptions: prefill at {args.mfu:g} of {spec.bf16_tflops:g} TFLOP/s; decode at {args.bw_efficiency:g} "
          f"of {spec.tb_s:g} TB/s; HBM {spec.hbm_gb:g} GB; GB = 1e9 bytes")
    if args.json:
        print(json.dumps({"dense": asdict(dense), "method": asdict(method)}))
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``cost`` sub-command to ``longattn``'s sub-parsers."""
    p = subparsers.add_parser("cost", help="analytic prefill/decode time, KV memory and concurrency")
    p.add_argument("--model", default="llama3-8b", help=f"preset ({', '.join(PRESETS)}) or a config.json path")
    p.add_argument("--context", type=_tokens, default=_tokens("128k"), help="tokens, e.g. 131072 or 128k")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--hbm-gb", type=float, default=None, help="override the GPU's HBM size (GB)")
    p.add_argument("--tb-s", type=float, default=None, help="override the GPU's bandwidth (TB/s)")
    p.add_argument("--tflops", type=float, default=None, help="override the GPU's dense bf16 TFLOP/s")
    p.add_argument("--density", type=float, default=1.0, help="fraction of prefill attention FLOPs kept")
    p.add_argument("--kv-keep", type=float, default=1.0, help="fraction of the KV cache kept / read per step")
    p.add_argument("--kv-bytes", type=float, default=2.0, help="bytes per cached element (quantised caches < 2)")
    p.add_argument("--weight-bytes", type=float, default=2.0, help="bytes per weight")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="prefill fraction of peak FLOP/s")
    p.add_argument("--bw-efficiency", type=float, default=DEFAULT_BW_EFFICIENCY, help="decode fraction of HBM BW")
    p.add_argument("--json", action="store_true", help="also print both estimates as JSON")
    p.set_defaults(fn=cmd_cost)
    return p


if __name__ == "__main__":  # `python -m longattn.cost cost ...` until the CLI wires the sub-command
    parser = argparse.ArgumentParser(prog="longattn")
    add_cli(parser.add_subparsers(dest="command", required=True))
    cli_args = parser.parse_args()
    raise SystemExit(cli_args.fn(cli_args))
