"""Split count of the decode kernel on one GPU call: every forced split count beside the heuristic's choice,
CUDA-graph and eager timing (longattn.bench.decode's method), each checked against the oracle. Bf16, GQA 32/8,
d = 128. Tuning notes go to benchmarks/NOTES-decode.md. Usage: python benchmarks/decode_sweep.py OUT.jsonl"""

import json
import math
import sys

import torch

from longattn.bench.decode import L2_ROTATE_BYTES, _check, _time
from longattn.kernels import decode as kd
from longattn.kernels.page_select import page_bounds, page_scores, select_pages

HQ, HKV, D, PAGE, BUDGET = 32, 8, 128, 64, 4096
dev, dt = torch.device("cuda"), torch.bfloat16
CASES = [  # (name, batch, cache length, selected, forced split counts)
    ("dense", 1, 8192, False, [16, 32, 64]),
    ("selected", 1, 131072, True, [4, 8, 16, 32, 64]),
    ("dense", 1, 32768, False, [32, 64, 128, 256]),
    ("selected", 8, 131072, True, [1, 2, 4, 8]),
    ("dense", 8, 8192, False, [4, 8, 16]),
]


def inputs(B: int, L: int, selected: bool) -> list[tuple]:
    """Enough (q, k, v[, page_indices, page_counts]) sets that one step reads past the L2 several times."""
    per_set = 2 * B * HKV * (BUDGET if selected else L) * D * 2
    g = torch.Generator(device=dev).manual_seed(L + B)
    k = torch.randn(B, HKV, L, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(B, HKV, L, D, device=dev, dtype=dt, generator=g)
    sets = []
    for _ in range(max(1, math.ceil(L2_ROTATE_BYTES / per_set))):
        q = torch.randn(B, HQ, 1, D, device=dev, dtype=dt, generator=g)
        if selected:  # one cache, fresh queries: each picks its own pages
            sets.append((q, k, v, *select_pages(page_scores(q, *page_bounds(k, PAGE)), BUDGET, PAGE)))
        else:
            sets.append((q, torch.randn_like(k), torch.randn_like(v)) if sets else (q, k, v))
    return sets


def call(s: tuple, splits: int | None) -> tuple:
    sel = (PAGE, s[3], s[4]) if len(s) == 5 else (None, None, None)
    return kd.decode_triton(s[0], s[1], s[2], None, None, sel[0], sel[1], sel[2], D ** -0.5, splits=splits)


def main(out_path: str) -> None:
    for name, B, L, selected, forced in CASES:
        sets = inputs(B, L, selected)
        n_units = BUDGET // PAGE if selected else L // kd.DENSE_UNIT
        unit, min_tokens = (PAGE, kd.MIN_SPLIT_TOKENS_SELECTED) if selected else (kd.DENSE_UNIT, kd.MIN_SPLIT_TOKENS)
        auto, _ = kd.choose_splits(B * HKV, n_units, unit, kd._sm_count(dev), min_tokens)
        for splits in [None, *forced]:
            s = sets[0]
            out, lse = call(s, splits)
            sel = {"page_size": PAGE, "page_indices": s[3], "page_counts": s[4]} if selected else {}
            ok = _check(out, lse, *s[:3], **sel)["correct"]
            t = _time([lambda s=s, n=splits: call(s, n) for s in sets], dev)
            row = {"case": name, "batch": B, "cache_len": L, "splits": splits or auto, "auto": splits is None,
                   "correct": ok, **t, "copies": len(sets)}
            with open(out_path, "a") as f:  # row by row: a run cut short keeps what it measured
                f.write(json.dumps(row) + "\n")
            print(f"{name:8s} B={B} L={L:6d} splits={row['splits']:3d}{'*' if splits is None else ' '} ok={ok} "
                  f"graph {t['ms'] * 1e3:7.2f} us  eager {t.get('ms_eager', 0) * 1e3:7.2f} us", flush=True)
        del sets
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1])
