"""`longattn calibrate`: write the once-per-model JSON files some methods read — DuoAttention's head gates,
MInference's per-head pattern search and MoA's per-head windows — so users need no Python for this step."""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

METHODS = ("duo", "minference", "moa")
LENGTHS = {"duo": 2048, "minference": 8000, "moa": 2048}  # MInference's candidates hold budgets of up to 7096 tokens


def calibration_ids(tokenizer, length: int, seed: int = 0) -> torch.Tensor:
    """[1, ~length] token ids of a single-needle retrieval prompt over the noise haystack (offline, deterministic)."""
    from longattn.eval.tasks.needles import niah_single

    sample = niah_single(tokenizer, length, 0.5, random.Random(seed), "noise")
    return tokenizer(sample.prompt, return_tensors="pt").input_ids


def calibrate(method: str, model, tokenizer, out: Path, *, length: int, density: float = 0.5, sinks: int = 64,
              recent: int = 256) -> None:
    """Run ``method``'s calibration on ``model`` and save it at ``out`` (``sinks``, ``recent``: Duo's window)."""
    if method == "duo":  # synthetic passkey prompts, gates trained end to end as in the paper
        from longattn.methods.decode.duo_gates import optimize_gates

        optimize_gates(model, out, length=length, sinks=sinks, recent=recent)
    elif method == "minference":
        from longattn.methods.prefill.minference_search import save_config, search

        save_config(search(model, calibration_ids(tokenizer, length)), out)
    elif method == "moa":
        from longattn.methods.prefill.moa import calibrate_moa

        calibrate_moa(model, calibration_ids(tokenizer, length), density=density, path=out)
    else:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Load the model, calibrate, print where the file went and how to use it."""
    from longattn.hf.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    length = args.length or LENGTHS[args.method]
    calibrate(args.method, model, tokenizer, out, length=length, density=args.density, sinks=args.sinks,
              recent=args.recent)
    knob = "gates_path" if args.method == "duo" else "config"
    print(f"{args.method}: wrote {out} in {time.perf_counter() - start:.1f} s; use it as {args.method}:{knob}={out}")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``calibrate`` sub-command to ``longattn``'s sub-parsers."""
    p = subparsers.add_parser("calibrate", help="once-per-model calibration files (DuoAttention, MInference, MoA)")
    p.add_argument("method", choices=METHODS)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--model", default=None, help="local HF folder or cached hub id (default: embedded model)")
    p.add_argument("--length", type=int, default=0,
                   help=f"calibration prompt tokens (default: {', '.join(f'{k} {v}' for k, v in LENGTHS.items())})")
    p.add_argument("--density", type=float, default=0.5, help="MoA: target attention density")
    p.add_argument("--sinks", type=int, default=64, help="DuoAttention: streaming heads' sink tokens (as in eval)")
    p.add_argument("--recent", type=int, default=256, help="DuoAttention: streaming heads' recent tokens (as in eval)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.set_defaults(fn=cmd_calibrate)
    return p
