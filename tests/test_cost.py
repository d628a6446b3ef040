"""The analytic cost model: a hand-computed tiny case, preset parameter counts, monotonicity, CLI and errors."""

from __future__ import annotations

import argparse
import types

import pytest

from longattn.cost import PRESETS, GPUSpec, add_cli, estimate, model_shape

TINY = {"num_hidden_layers": 1, "hidden_size": 4, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 2, "intermediate_size": 8, "vocab_size": 10, "tie_word_embeddings": True}
UNIT_GPU = GPUSpec("unit", hbm_gb=1e-6, tb_s=1.0, bf16_tflops=1.0)  # 1000 bytes, 1e12 B/s, 1e12 FLOP/s


def test_tiny_model_by_hand():
    shape = model_shape(TINY)
    # q 4x4, k 4x2, v 4x2, o 4x4 = 48; MLP 3 x 4x8 = 96; tied embedding / LM head 10x4 = 40
    assert (shape.layer_params(), shape.matmul_params(), shape.total_params()) == (144, 184, 184)
    c = estimate(TINY, 10, gpu=UNIT_GPU, mfu=1.0, bw_efficiency=1.0)
    # prefill: 2 * 184 * 10 matmul + 4 * (1 layer * 2 heads * 2 dims) * 55 causal pairs = 3680 + 880
    assert c.prefill_flops == 4560 and c.prefill_s == pytest.approx(4560e-12)
    # KV: K and V x 1 layer x 1 kv head x 2 dims x 10 tokens x 2 bytes; decode reads 184 weights x 2 B + KV
    assert c.kv_bytes_per_request == 80 and c.decode_bytes == 448
    # the step's 2 * 184 + 4 * 4 * 10 = 528 FLOPs at 1e12 FLOP/s outlast its 448 bytes at 1e12 B/s: compute-bound
    assert c.decode_step_s == pytest.approx(528e-12)
    fast = GPUSpec("fast", hbm_gb=1e-6, tb_s=1.0, bf16_tflops=1000.0)
    assert estimate(TINY, 10, gpu=fast, mfu=1.0, bw_efficiency=1.0).decode_step_s == pytest.approx(448e-12)
    assert c.weight_bytes == 368 and c.max_concurrent == (1000 - 368) // 80
    sparse = estimate(TINY, 10, gpu=UNIT_GPU, mfu=1.0, bw_efficiency=1.0, density=0.5, kv_keep=0.5, kv_bytes=1)
    assert sparse.prefill_flops == 3680 + 440 and sparse.kv_bytes_per_request == 20
    assert sparse.max_concurrent == (1000 - 368) // 20


def test_presets_match_published_sizes():
    assert model_shape("llama3-8b").total_params() == pytest.approx(8.03e9, rel=0.01)
    assert model_shape("llama3-70b").total_params() == pytest.approx(70.6e9, rel=0.01)
    assert model_shape("qwen2-7b").total_params() == pytest.approx(7.62e9, rel=0.01)
    assert model_shape("smollm2-135m").total_params() == pytest.approx(134.5e6, rel=0.01)
    # Llama 3 8B at 128k: 2 x 32 layers x 8 kv heads x 128 x 131072 x 2 bytes = 16 GiB of KV
    assert estimate("llama3-8b", 131072).kv_bytes_per_request == 2 * 32 * 8 * 128 * 131072 * 2


def test_transformers_config_matches_preset():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=14336, vocab_size=128256)
    shape = model_shape(cfg, name="llama3-8b")
    assert shape == model_shape("llama3-8b")


def test_config_object_and_dict_agree():
    obj = types.SimpleNamespace(**TINY)
    assert model_shape(obj) == model_shape(TINY, name=model_shape(obj).name)
    no_kv = {k: v for k, v in TINY.items() if k not in ("num_key_value_heads", "head_dim")}
    s = model_shape(no_kv)
    assert (s.kv_heads, s.head_dim) == (2, 2)  # MHA and hidden / heads by default


@pytest.mark.parametrize("model", list(PRESETS))
def test_monotonic(model):
    base = estimate(model, 32768, batch=2)
    longer = estimate(model, 65536, batch=2)
    assert longer.prefill_s > base.prefill_s and longer.decode_step_s > base.decode_step_s
    assert longer.kv_bytes_per_request > base.kv_bytes_per_request and longer.max_concurrent <= base.max_concurrent
    sparse = estimate(model, 32768, batch=2, density=0.1, kv_keep=0.0625)
    assert sparse.prefill_s < base.prefill_s and sparse.decode_step_s < base.decode_step_s
    assert sparse.max_concurrent >= base.max_concurrent
    assert estimate(model, 32768, batch=4).decode_step_s > base.decode_step_s
    assert estimate(model, 32768, batch=2, gpu="h200").decode_step_s < base.decode_step_s


def test_weights_larger_than_hbm_fit_no_request():
    assert estimate("llama3-70b", 8192, gpu="h100").max_concurrent == 0


@pytest.mark.parametrize("kwargs,words", [
    ({"density": 0}, ["density", "(0, 1]"]), ({"kv_keep": 1.5}, ["kv_keep"]), ({"batch": 0}, ["batch"]),
    ({"gpu": "v100"}, ["gpu", "v100"]), ({"mfu": -1}, ["mfu"]), ({"kv_bytes": 0}, ["kv_bytes"]),
])
def test_bad_arguments(kwargs, words):
    with pytest.raises(ValueError) as e:
        estimate("llama3-8b", 4096, **kwargs)
    assert all(w in str(e.value) for w in words)


def test_bad_model_and_context():
    with pytest.raises(ValueError, match="llama9"):
        estimate("llama9", 4096)
    with pytest.raises(ValueError, match="context"):
        estimate("llama3-8b", 0)
    with pytest.raises(ValueError, match="hidden_size"):
        model_shape({"num_hidden_layers": 2})


def test_cli_prints_the_table(capsys):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["cost", "--model", "llama3-8b", "--context", "128k", "--batch", "1", "--gpu", "h100",
                              "--density", "0.1", "--kv-keep", "0.0625"])
    assert args.context == 131072 and args.fn(args) == 0
    out = capsys.readouterr().out
    assert "llama3-8b" in out and "H100 SXM" in out and "max concurrent requests" in out
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert lines["KV per request (GB)"].endswith("16.00x") and lines["decode tokens/s (batch)"].endswith("2.00x")
