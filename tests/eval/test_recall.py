"""MQAR recall-vs-state: the data generator's contract, that training learns, resumable JSONL, table, plot, CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from longattn.eval import recall
from longattn.eval.recall import IGNORE, RecallConfig, TinyLM, mqar_batch, run_recall, train
from longattn.methods.registry import names


@pytest.mark.parametrize(("S", "pairs", "vocab"), [(12, 4, 16), (64, 4, 64), (300, 16, 64)])
def test_mqar_queries_ask_for_the_paired_values(S, pairs, vocab):
    inputs, targets = mqar_batch(8, S, pairs, vocab, torch.Generator().manual_seed(S))
    assert inputs.shape == targets.shape == (8, S)
    half = vocab // 2
    for x, t in zip(inputs, targets, strict=True):
        keys, values = x[0:2 * pairs:2], x[1:2 * pairs:2]
        assert len(set(keys.tolist())) == pairs and bool(((keys >= 1) & (keys < half)).all())
        assert bool(((values >= half) & (values < vocab)).all())
        q = (t != IGNORE).nonzero().flatten()
        assert len(q) == pairs and int(q.min()) >= 2 * pairs
        pair = dict(zip(keys.tolist(), values.tolist(), strict=True))
        assert all(pair[int(x[p])] == int(t[p]) for p in q)
        assert sorted(x[q].tolist()) == sorted(keys.tolist())  # every key is asked once
        rest = torch.ones(S, dtype=torch.bool)
        rest[:2 * pairs] = False
        rest[q] = False
        assert bool((x[rest] == 0).all())


def test_mqar_rejects_impossible_sizes():
    g = torch.Generator()
    with pytest.raises(ValueError, match="num_pairs"):
        mqar_batch(1, 256, 40, 64, g)
    with pytest.raises(ValueError, match="seq_len"):
        mqar_batch(1, 20, 8, 64, g)


def test_softmax_training_reduces_the_loss():
    torch.set_num_threads(2)
    row = train(RecallConfig("softmax", {"n_heads": 2}, seq_len=32, num_pairs=4, vocab=16, d_model=32, steps=60,
                             batch=16, lr=3e-3, eval_size=32))
    assert row["final_loss"] < row["first_loss"] - 0.3, row
    assert 0.0 <= row["accuracy"] <= 1.0


def test_the_curriculum_climbs_doubling_lengths_then_trains_at_the_target(monkeypatch):
    shapes = []

    def spy(n, seq_len, num_pairs, vocab, generator):
        shapes.append((seq_len, num_pairs))
        return mqar_batch(n, seq_len, num_pairs, vocab, generator)

    monkeypatch.setattr(recall, "mqar_batch", spy)
    train(RecallConfig("softmax", {"n_heads": 2}, seq_len=256, d_model=16, steps=8, batch=2, eval_size=2))
    assert shapes[1:] == [(64, 4), (64, 4), (128, 8), (128, 8)] + [(256, 16)] * 4  # shapes[0]: the held-out set
    assert RecallConfig("softmax", seq_len=64, steps=8).train_shape(0) == (64, 4)  # nothing shorter: no curriculum


def test_a_non_finite_step_is_skipped_not_applied(monkeypatch):
    calls, cross_entropy = [], torch.nn.functional.cross_entropy

    def first_loss_nan(*args, **kwargs):
        calls.append(1)
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if len(calls) == 1 else loss

    monkeypatch.setattr(recall.F, "cross_entropy", first_loss_nan)
    row = train(RecallConfig("softmax", {"n_heads": 2}, seq_len=24, num_pairs=4, vocab=16, d_model=16, steps=25,
                             batch=4, eval_size=8))
    assert row["skipped_steps"] == 1 and math.isnan(row["first_loss"])
    assert math.isfinite(row["final_loss"])  # the last 20 losses: finite only if the NaN step was never applied


def test_the_head_is_tied_to_the_embedding():
    model = TinyLM(32, 16, "softmax", {"n_heads": 2})
    assert model.head.weight is model.embed.weight


@pytest.mark.parametrize("mixer", ["softmax", "sliding_window", *names("linear")])
def test_every_mixer_builds_a_model_with_a_state_size(mixer):
    opts = recall.SWEEP[mixer][0]
    model = TinyLM(64, 64, mixer, opts)
    assert model(torch.randint(0, 64, (2, 19))).shape == (2, 19, 64)
    b256, b1024 = model.state_bytes(256), model.state_bytes(1024)
    assert b256 > 0
    grows = mixer in ("softmax", "kernel_rpe", "long_conv", "probsparse", "softplus")  # no finite state: a cache
    assert (b1024 == 4 * b256) if grows else (b1024 == b256)


def test_unknown_mixer_raises():
    with pytest.raises(ValueError, match="mixer: unknown 'nope'"):
        TinyLM(64, 64, "nope", {})


def test_run_recall_is_resumable_and_writes_table_and_plot(tmp_path, monkeypatch, capsys):
    cfgs = [RecallConfig(m, o, seq_len=24, num_pairs=4, vocab=16, d_model=16, steps=2, batch=4, eval_size=8)
            for m, o in (("softmax", {"n_heads": 2}), ("based", {"n_heads": 1, "feature_dim": 4, "window": 4}))]
    out, png = tmp_path / "r.jsonl", tmp_path / "r.png"
    rows = run_recall(cfgs, out, png)
    assert len(rows) == 2 and png.stat().st_size > 0
    assert [json.loads(line)["label"] for line in out.read_text().splitlines()] == [r["label"] for r in rows]
    assert "| based(feature_dim=4, n_heads=1, window=4) |" in capsys.readouterr().out
    monkeypatch.setattr(recall, "train", lambda *a, **k: pytest.fail("a finished config was trained again"))
    assert len(run_recall(cfgs, out)) == 2


def test_add_cli_registers_the_recall_command():
    parser = argparse.ArgumentParser()
    recall.add_cli(parser.add_subparsers())
    args = parser.parse_args(["recall", "--quick", "--out", "x.jsonl"])
    assert args.fn is recall.cmd_recall and args.quick and args.out == "x.jsonl"
