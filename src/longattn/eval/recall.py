"""Recall vs state (``longattn eval recall``): train tiny 2-layer models on multi-query associative recall (MQAR,
Zoology-style: key-value pairs, then queries for the keys) with softmax, sliding-window and every registered linear
mixer at several state sizes, and report held-out accuracy against the recurrent state bytes per sequence. Every mixer
gets one recipe: tied input/output embeddings, AdamW with warm-up + cosine decay, and a length curriculum (the first
half of the steps climbs doubling lengths up to the target), which lets softmax escape MQAR's loss plateau at 512+."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longattn.jsonl import open_append
from longattn.methods.linear.base import LinearLayer
from longattn.methods.linear.window import WindowAttention
from longattn.methods.registry import get, names

IGNORE = -100


def mqar_batch(n: int, seq_len: int, num_pairs: int, vocab: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` MQAR sequences: ``num_pairs`` (key, value) pairs, then every key once more at a random position of the
    rest (filler token 0 elsewhere). Keys come from [1, vocab/2), values from [vocab/2, vocab); the target at a
    query position is its key's value (IGNORE elsewhere). Returns (inputs, targets), both [n, seq_len] long."""
    half = vocab // 2
    if num_pairs < 1 or num_pairs > half - 1:
        raise ValueError(f"num_pairs: expected 1..{half - 1} (distinct keys below vocab/2), got {num_pairs}")
    if seq_len < 3 * num_pairs:
        raise ValueError(f"seq_len: expected >= 3 * num_pairs = {3 * num_pairs} (pairs + queries), got {seq_len}")
    keys = torch.rand(n, half - 1, generator=generator).argsort(-1)[:, :num_pairs] + 1
    values = torch.randint(half, vocab, (n, num_pairs), generator=generator)
    inputs = torch.zeros(n, seq_len, dtype=torch.long)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    inputs[:, 0:2 * num_pairs:2], inputs[:, 1:2 * num_pairs:2] = keys, values
    region = seq_len - 2 * num_pairs
    pos = torch.rand(n, region, generator=generator).argsort(-1)[:, :num_pairs] + 2 * num_pairs
    order = torch.rand(n, num_pairs, generator=generator).argsort(-1)
    inputs.scatter_(1, pos, keys.gather(1, order))
    targets.scatter_(1, pos, values.gather(1, order))
    return inputs, targets


class SoftmaxMixer(nn.Module):
    """Full causal softmax attention (SDPA); its 'state' is the KV cache, which grows with the sequence."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, S, d = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, d))

    def cache_bytes(self, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """The KV cache at ``seq_len``."""
        return 2 * batch * seq_len * self.o_proj.in_features * torch.empty((), dtype=dtype).element_size()


def build_mixer(mixer: str, d_model: int, options: dict) -> nn.Module:
    """``softmax``, ``sliding_window`` (option ``window``) or any registered linear layer by name."""
    if mixer == "softmax":
        return SoftmaxMixer(d_model, options.get("n_heads", 2))
    if mixer == "sliding_window":
        return WindowAttention(d_model, options.get("n_heads", 2), window=options["window"])
    if mixer not in names("linear"):
        raise ValueError(f"mixer: unknown {mixer!r}; valid: softmax, sliding_window, {', '.join(names('linear'))}")
    return get(mixer).factory(d_model, **options)


class Block(nn.Module):
    """Pre-norm block: short causal depthwise conv (token shift, as in Based/Zoology), mixer, MLP."""

    def __init__(self, d_model: int, mixer: nn.Module, conv: int = 4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.conv = nn.Conv1d(d_model, d_model, conv, groups=d_model, padding=conv - 1)
        self.mixer = mixer
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        h = self.conv(h.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2)
        x = x + self.mixer(h)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Embedding, ``layers`` x [conv + mixer + MLP], head."""

    def __init__(self, vocab: int, d_model: int, mixer: str, options: dict, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, build_mixer(mixer, d_model, options)) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        nn.init.normal_(self.embed.weight, std=d_model ** -0.5)
        self.head.weight = self.embed.weight  # tied: a retrieved value's embedding scores that value at once

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def state_bytes(self, seq_len: int) -> int:
        """Mixer state per sequence (fp32) summed over layers: the fixed recurrent state of recurrent layers, the
        cache at ``seq_len`` of the others (softmax, ProbSparse, ...); the short convs' state, equal for every
        mixer, is left out."""
        return sum(b.mixer.state_bytes(1) if isinstance(b.mixer, LinearLayer) else b.mixer.cache_bytes(seq_len)
                   for b in self.blocks)


@dataclass
class RecallConfig:
    """One training run: a mixer with its options on MQAR at one length."""

    mixer: str
    options: dict = field(default_factory=dict)
    seq_len: int = 256
    num_pairs: int | None = None  # default seq_len // 16 (at least 4)
    vocab: int | None = None  # default max(64, 4 * pairs): keys below vocab/2, values above
    d_model: int = 64
    layers: int = 2
    steps: int = 1000
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0
    eval_size: int = 256
    start_len: int = 64  # length curriculum: the first half of training climbs doubling lengths from here to seq_len

    @property
    def pairs(self) -> int:
        return self.num_pairs or max(4, self.seq_len // 16)

    @property
    def vocab_size(self) -> int:
        return self.vocab or max(64, 4 * self.pairs)

    def train_shape(self, step: int) -> tuple[int, int]:
        """(length, pairs) of training step ``step``: the first half of the steps climbs the doubling lengths
        start_len, 2 start_len, ... below seq_len in equal stages (pairs scaled with the length), the rest is at
        seq_len."""
        ladder = [self.start_len << i for i in range(32) if self.start_len << i < self.seq_len]
        half = self.steps // 2
        if not ladder or step >= half:
            return self.seq_len, self.pairs
        L = ladder[step * len(ladder) // half]
        return L, max(1, self.pairs * L // self.seq_len)

    def key(self) -> str:
        """Identifies a finished run in the JSONL (resume skips it)."""
        return json.dumps({k: v for k, v in asdict(self).items()}, sort_keys=True)


def accuracy(model: TinyLM, inputs: Tensor, targets: Tensor, batch: int = 64) -> float:
    """Fraction of query positions whose argmax prediction is the right value."""
    right = total = 0
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            logits = model(inputs[i:i + batch])
            t = targets[i:i + batch]
            m = t != IGNORE
            right += int((logits.argmax(-1)[m] == t[m]).sum())
            total += int(m.sum())
    return right / max(total, 1)


def train(cfg: RecallConfig, log_every: int = 0, device: str = "cpu") -> dict:
    """Train one model on fresh MQAR batches (AdamW, warm-up + cosine, a length curriculum, non-finite steps
    skipped) and score it on held-out sequences of ``cfg.seq_len``."""
    torch.manual_seed(cfg.seed)
    V = cfg.vocab_size
    model = TinyLM(V, cfg.d_model, cfg.mixer, cfg.options, cfg.layers).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.98))
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    test = [t.to(device) for t in mqar_batch(cfg.eval_size, cfg.seq_len, cfg.pairs, V,
                                             torch.Generator().manual_seed(10_000))]
    losses, skipped, t0 = [], 0, time.perf_counter()
    for step in range(cfg.steps):
        inputs, targets = (t.to(device) for t in mqar_batch(cfg.batch, *cfg.train_shape(step), V, g))
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)):
            opt.step()
        else:  # a diverging batch (say, an unstable test-time memory update) is skipped, never applied
            skipped += 1
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"  {cfg.mixer} S={cfg.seq_len} step {step + 1}: loss {sum(losses[-log_every:]) / log_every:.3f}",
                  flush=True)
    train_s = time.perf_counter() - t0
    tail = losses[-20:]
    return {"task": "mqar", **asdict(cfg), "num_pairs": cfg.pairs, "vocab": V, "device": str(device),
            "label": label(cfg.mixer, cfg.options), "state_bytes": model.state_bytes(cfg.seq_len),
            "params": sum(p.numel() for p in model.parameters()), "accuracy": accuracy(model, *test),
            "first_loss": losses[0], "final_loss": sum(tail) / len(tail), "skipped_steps": skipped,
            "train_s": round(train_s, 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "git_sha": _git_sha(), "key": cfg.key()}


def label(mixer: str, options: dict) -> str:
    """Readable config name, e.g. ``based(feature_dim=8)``."""
    return f"{mixer}({', '.join(f'{k}={v}' for k, v in sorted(options.items()))})" if options else mixer


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# state sizes: heads (head_dim = d_model / heads) for the kernel-shaped layers, feature size for Based/Hedgehog,
# window for sliding-window attention
SWEEP: dict[str, list[dict]] = {
    "softmax": [{"n_heads": 2}],
    "sliding_window": [{"window": w} for w in (16, 64, 128)],
    "linear_elu": [{"n_heads": h} for h in (1, 4)],
    "lightning": [{"n_heads": h} for h in (1, 4)],
    "transnormer": [{"n_heads": h} for h in (1, 4)],
    "retnet": [{"n_heads": h} for h in (1, 4)],
    "hedgehog": [{"n_heads": h, "feature_dim": f} for h, f in ((1, 64), (4, 16))],
    "based": [{"n_heads": 1, "feature_dim": f, "window": 16} for f in (4, 8, 16)],
    "aaren": [{"n_heads": h} for h in (1, 4)],
    "titans": [{"n_heads": h} for h in (1, 4)],
    "lightnet": [{"n_heads": h} for h in (1, 4)],
    "flowformer": [{"n_heads": h} for h in (1, 4)],
    "kernel_rpe": [{"n_heads": 2}],
    "long_conv": [{}],
    "probsparse": [{"n_heads": 2}],
    "softplus": [{"n_heads": 2}],
}


def sweep_configs(lengths: Iterable[int], mixers: Iterable[str], sizes: int | None = None,
                  **overrides) -> list[RecallConfig]:
    """The grid: every mixer's state sizes (the first ``sizes`` of them, default all) at every length."""
    out = []
    for S in lengths:
        for m in mixers:
            for opts in SWEEP.get(m, [{}])[:sizes]:
                out.append(RecallConfig(mixer=m, options=dict(opts), seq_len=S, **overrides))
    return out


def run_recall(configs: list[RecallConfig], out: Path, plot: Path | None = None, log_every: int = 0,
               device: str = "cpu") -> list[dict]:
    """Train every config not already in ``out`` (JSONL, appended row by row), then print the table and plot."""
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    done = {r["key"] for r in rows}
    for i, cfg in enumerate(configs):
        if cfg.key() in done:
            continue
        row = train(cfg, log_every, device)
        print(f"[{i + 1}/{len(configs)}] {row['label']} S={cfg.seq_len}: acc {row['accuracy']:.3f} "
              f"state {row['state_bytes']} B loss {row['final_loss']:.3f} ({row['train_s']} s)", flush=True)
        with open_append(out) as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    keys = {c.key() for c in configs}
    rows = [r for r in rows if r["key"] in keys]
    print(markdown_table(rows, str(out)))
    if plot is not None:
        plot_rows(rows, plot)
        print(f"plot: {plot}")
    return rows


def markdown_table(rows: list[dict], source: str = "") -> str:
    """Accuracy per config (rows) and length (columns), with the state bytes at each length."""
    lengths = sorted({r["seq_len"] for r in rows})
    by = {(r["label"], r["seq_len"]): r for r in rows}
    labels = sorted({r["label"] for r in rows}, key=lambda lab: (lab.split("(")[0], min(
        by[(lab, S)]["state_bytes"] for S in lengths if (lab, S) in by)))
    head = "| mixer | " + " | ".join(f"S={S} acc | S={S} state B" for S in lengths) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(lengths))]
    for lab in labels:
        cells = []
        for S in lengths:
            r = by.get((lab, S))
            cells += [f"{r['accuracy']:.3f}", str(r["state_bytes"])] if r else ["", ""]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    if source:
        lines.append(f"\nrows: {source}")
    return "\n".join(lines)


def plot_rows(rows: list[dict], path: Path) -> None:
    """Accuracy vs state bytes (log x), one panel per length, one marker series per mixer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["seq_len"] for r in rows})
    mixers = sorted({r["mixer"] for r in rows})
    style = {m: dict(color=plt.get_cmap("tab20")(i % 20), marker="osD^v<>"[i % 7]) for i, m in enumerate(mixers)}
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths) + 1.5, 4), squeeze=False,
                             layout="constrained")
    for ax, S in zip(axes[0], lengths, strict=True):
        for m in mixers:
            pts = sorted((r["state_bytes"], r["accuracy"]) for r in rows if r["seq_len"] == S and r["mixer"] == m)
            if pts:
                ax.plot(*zip(*pts, strict=True), **style[m])
        ax.set(xscale="log", xlabel="mixer state per sequence (bytes, fp32)", ylabel="MQAR accuracy",
               title=f"MQAR, seq_len={S}", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    fig.legend([plt.Line2D([], [], **style[m]) for m in mixers], mixers, loc="outside right", fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_recall(args: argparse.Namespace) -> int:
    """Entry point of ``longattn eval recall``."""
    torch.set_num_threads(args.threads)
    if args.quick:
        lengths, mixers = [64], ["softmax", "linear_elu", "based"]
        overrides = dict(steps=args.steps or 300, batch=64, d_model=64, eval_size=128, sizes=1)
    else:
        lengths = [int(x) for x in args.lengths.split(",")]
        mixers = args.mixers.split(",") if args.mixers else list(SWEEP)
        overrides = dict(steps=args.steps or 1000, batch=args.batch, d_model=args.d_model, lr=args.lr,
                         seed=args.seed)
    valid = {"softmax", "sliding_window", *names("linear")}
    unknown = [m for m in mixers if m not in valid]
    if unknown:
        raise SystemExit(f"--mixers: unknown {unknown}; valid: {', '.join(sorted(valid))}")
    out = Path(args.out or ("reports/recall-quick.jsonl" if args.quick else "reports/recall.jsonl"))
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu"
    run_recall(sweep_configs(lengths, mixers, **overrides), out, plot, log_every=args.log_every, device=device)
    return 0


def add_cli(eval_subparsers) -> argparse.ArgumentParser:
    """Add the ``recall`` sub-command to ``longattn eval``."""
    p = eval_subparsers.add_parser("recall", help="MQAR recall vs recurrent state size (tiny models, CPU)")
    p.add_argument("--quick", action="store_true", help="S=64, three mixers, one size each: ~1-2 min on CPU")
    p.add_argument("--lengths", default="256,512,1024")
    p.add_argument("--mixers", default=None, help=f"comma list (default: all of {', '.join(SWEEP)})")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 1000; quick 300)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", choices=["cpu", "auto"], default="cpu", help="auto: CUDA when available")
    p.add_argument("--log-every", type=int, default=0, help="print the mean training loss every N steps")
    p.add_argument("--out", default=None, help="JSONL (appended; finished configs are skipped on rerun)")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSONL path with .png)")
    p.set_defaults(fn=cmd_recall)
    return p
