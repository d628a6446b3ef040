"""DuoAttention's gate optimisation (Xiao et al., 2024), end to end: each kv head's attention output is mixed
α·full + (1 − α)·streaming (sinks + recent), and the gates α — one per layer × kv head — are trained by Adam with
the model frozen so that the final hidden states at the answer positions of synthetic passkey prompts stay close to
the full model's, plus λ·mean(α) pushing heads to stream. Heads the answer needs keep high gates.

As the policy deploys it (a dense prefill; streaming heads drop tokens only for the decoded tokens), the prompt
before the answer is attended densely and only the answer positions mix: the prefix's keys and values are captured
once without gradients, and each step recomputes just the answer span over them."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import Tensor

from longattn.methods.decode.base import check_int
from longattn.methods.decode.calibration import capture_qkv, passkey_ids

GATED_NAME = "longattn_duo_gates"


def window_masks(start: int, length: int, sinks: int, recent: int) -> tuple[Tensor, Tensor]:
    """Bool [length - start, length] masks for queries at positions start..length-1: causal (full attention) and
    causal ∩ (kv < sinks or kv > q - recent) (a streaming head)."""
    q = torch.arange(start, length)[:, None]
    kv = torch.arange(length)
    causal = kv <= q
    return causal, causal & ((kv < sinks) | (kv > q - recent))


@contextlib.contextmanager
def gated_attention(model, prefix: list[tuple[Tensor, Tensor]], alpha: Tensor, sinks: int, recent: int):
    """Within the block, ``model`` runs the tokens after ``prefix`` (per-layer keys and values [B, Hkv, P, D]) with
    every kv head's output mixed α·full + (1 − α)·streaming, ``alpha`` [layers, kv heads]; weights frozen."""
    from transformers import AttentionInterface

    from longattn.hf.patch import _set_attn_implementation

    def mixed(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        past_k, past_v = prefix[module.layer_idx]
        k, v = torch.cat([past_k, key], 2), torch.cat([past_v, value], 2)
        causal, window = window_masks(past_k.shape[2], k.shape[2], sinks, recent)
        B, Hq, Sq, D = query.shape
        q = query.view(B, k.shape[1], Hq // k.shape[1], Sq, D)  # query heads grouped by their kv head
        k, v = k[:, :, None], v[:, :, None]
        s = (q @ k.transpose(-1, -2)) * scaling
        full = torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v
        stream = torch.softmax(s.masked_fill(~window, float("-inf")), -1) @ v
        a = alpha[module.layer_idx][None, :, None, None, None]
        return (a * full + (1 - a) * stream).view(B, Hq, Sq, D).transpose(1, 2).contiguous(), None

    AttentionInterface.register(GATED_NAME, mixed)
    previous = model.config._attn_implementation
    trainable = [p for p in model.parameters() if p.requires_grad]
    _set_attn_implementation(model, GATED_NAME)
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        _set_attn_implementation(model, previous)


def train_gates(model, ids: Tensor, answer: int, sinks: int, recent: int, lam: float, steps: int,
                lr: float) -> tuple[Tensor, float]:
    """Gates [layers, kv heads] in [0, 1] by projected Adam on ``ids`` [B, S] whose last ``answer`` tokens are the
    answer span; also the final distillation loss (relative to streaming every head)."""
    split = ids.shape[1] - answer
    prefix = [(k, v) for _, k, v in capture_qkv(model, ids[:, :split])]
    alpha = torch.ones(len(prefix), int(model.config.num_key_value_heads), requires_grad=True)
    positions = torch.arange(split, ids.shape[1]).expand(ids.shape[0], -1)
    decoder = model.base_model

    def hidden() -> Tensor:
        return decoder(ids[:, split:], position_ids=positions, use_cache=False).last_hidden_state

    opt = torch.optim.Adam([alpha], lr=lr)
    with gated_attention(model, prefix, alpha, sinks, recent):
        with torch.no_grad():
            target = hidden()  # every gate 1: the full model
            alpha.zero_()
            scale = ((hidden() - target) ** 2).sum(-1).mean().clamp(min=1e-12)  # every head streaming
            alpha.fill_(1.0)
        for _ in range(steps):
            opt.zero_grad()
            distill = ((hidden() - target) ** 2).sum(-1).mean() / scale
            (distill + lam * alpha.mean()).backward()
            opt.step()
            with torch.no_grad():
                alpha.clamp_(0.0, 1.0)
    return alpha.detach(), float(distill.detach())


def optimize_gates(model, path: str | Path, *, samples: int = 2, length: int = 2048, answer: int = 16,
                   sinks: int = 64, recent: int = 256, lam: float = 0.3, steps: int = 150, lr: float = 0.02,
                   seed: int = 0) -> Tensor:
    """Optimise DuoAttention gates for ``model`` end to end on synthetic passkey prompts and save them as JSON at
    ``path`` (run once per model, with the ``sinks`` and ``recent`` the policy will use). Returns the gates."""
    check_int("samples", samples)
    check_int("answer", answer)
    check_int("length", length)
    check_int("steps", steps)
    if length // 2 - 3 * answer <= recent or length // 8 < sinks:
        raise ValueError(f"length: {length} tokens put the key inside the streaming window (sinks={sinks}, "
                         f"recent={recent}, answer={answer}); calibrate on longer prompts or a smaller window")
    ids = passkey_ids(samples, length, int(model.config.vocab_size), key_len=2 * answer, seed=seed)
    gates, loss = train_gates(model, ids, answer, sinks, recent, lam, steps, lr)
    Path(path).write_text(json.dumps({"model_type": model.config.model_type, "optimisation": "end-to-end",
                                      "samples": samples, "length": length, "answer": answer, "sinks": sinks,
                                      "recent": recent, "lambda": lam, "steps": steps, "lr": lr,
                                      "distill_loss": loss, "gates": gates.tolist()}, indent=1))
    return gates
