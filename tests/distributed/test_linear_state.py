"""State passing for linear attention on 3 gloo ranks against the token-by-token recurrence over the whole
sequence: outputs, the final state, and gradients of q, k, v and the gate; no decay, a per-head decay, a gate."""

from __future__ import annotations

import torch

from longattn import linear_attention
from longattn.distributed import linear_attention_cp, shard
from tests.distributed.launch import spawn


def check_linear(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(11)
    S = world * 21  # 21 tokens per rank: chunks of 16 end mid-shard
    q, k, v = (torch.randn(1, 2, S, 8, generator=g, dtype=torch.float64) for _ in range(3))
    gate = -torch.rand(1, 2, S, generator=g, dtype=torch.float64) * 0.3
    decay = torch.tensor([0.9, 0.99], dtype=torch.float64)
    g_out = torch.randn(1, 2, S, 8, generator=g, dtype=torch.float64)
    g_state = torch.randn(1, 2, 8, 8, generator=g, dtype=torch.float64)
    for kw in ({}, {"decay": decay}, {"gate": gate}):
        full = [t.clone().requires_grad_() for t in (q, k, v, gate)]
        fkw = {"decay": decay} if "decay" in kw else {"gate": full[3]} if "gate" in kw else {}
        out, state = linear_attention(*full[:3], **fkw, impl="recurrent", output_final_state=True)
        ((out * g_out).sum() + (state * g_state).sum()).backward()
        local = [shard(t, rank, world).detach().requires_grad_() for t in (q, k, v)]
        local_gate = shard(gate, rank, world).detach().requires_grad_()
        lkw = {"decay": decay} if "decay" in kw else {"gate": local_gate} if "gate" in kw else {}
        out_l, state_l = linear_attention_cp(*local, **lkw, impl="chunk", chunk_size=16, output_final_state=True)
        loss = (out_l * shard(g_out, rank, world)).sum() + ((state_l * g_state).sum() if rank == world - 1 else 0)
        loss.backward()
        what = next(iter(kw), "none")
        torch.testing.assert_close(out_l, shard(out.detach(), rank, world), rtol=1e-10, atol=1e-10,
                                   msg=lambda m, w=what: f"out ({w}): {m}")
        if rank == world - 1:
            torch.testing.assert_close(state_l, state.detach(), rtol=1e-10, atol=1e-10)
        pairs = list(zip("qkv", local, full[:3], strict=True)) + ([("gate", local_gate, full[3])] if lkw.get("gate")
                                                                   is not None else [])
        for name, mine, ref in pairs:
            torch.testing.assert_close(mine.grad, shard(ref.grad, rank, world), rtol=1e-9, atol=1e-9,
                                       msg=lambda m, n=name, w=what: f"d{n} ({w}): {m}")


def test_state_passing_matches_the_recurrence():
    spawn(check_linear, 3)
