"""Decode policies in the eval loop on a tiny random Llama: decode rows carry the KV fields, a budget at or above
the context decodes what the dense cache decodes (compression 1.0), a real budget compresses by measured bytes,
query-aware policies report what they read, reruns skip finished decode rows, bad specs fail before any run."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from longattn.cli import main, model_dtype  # noqa: E402
from longattn.eval import report, runner  # noqa: E402
from longattn.eval.methods import DENSE, expand_budgets, parse_decode, parse_method  # noqa: E402
from longattn.eval.tasks import make_sample  # noqa: E402
from tests.eval.chartok import ByteTokenizer  # noqa: E402

DECODE_FIELDS = {"decode", "decode_config", "kv_bytes_gpu", "kv_bytes_cpu", "kv_bytes_gpu_max", "kv_bytes_cpu_max",
                 "kv_bytes_kept", "kv_bytes_dense", "compression", "kv_read_fraction", "decode_ms_per_token",
                 "tokens_per_s"}
LENGTH = 300


@pytest.fixture(scope="module")
def tokens():
    tok = ByteTokenizer()
    return len(tok(make_sample(tok, "passkey", LENGTH, 0.5).prompt).input_ids)


@pytest.fixture(scope="module")
def decode_rows(model, tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("decode") / "eval.jsonl"
    decodes = [parse_decode(d) for d in ("dense", "streaming_llm:budget=4096", f"snapkv:budget={tokens}",
                                         "streaming_llm:budget=64", "snapkv:budget=64:window=16",
                                         f"snapkv:budget={tokens + 1}")]
    jobs = runner.grid(["passkey"], [LENGTH], [0.5], [parse_method("dense")], decodes=decodes)
    rows = runner.run(jobs, model, ByteTokenizer(), out, model_name="tiny", progress=False)
    return jobs, out, {r["decode"]: r for r in rows}


def test_decode_rows_carry_kv_fields(decode_rows):
    jobs, _, rows = decode_rows
    assert len(rows) == len(jobs) == 6
    measured = [r for r in rows.values() if not r.get("skipped")]
    assert len(measured) == 5 and all(set(r) >= DECODE_FIELDS for r in measured)
    for r in measured:
        assert r["kv_bytes_gpu"] == 0 and r["kv_bytes_cpu"] >= r["kv_bytes_kept"] > 0  # a CPU run holds it all there
        assert r["kv_bytes_cpu_max"] >= r["kv_bytes_cpu"] and r["decode_ms_per_token"] > 0 and r["tokens_per_s"] > 0
        assert r["kv_read_fraction"] is None  # none of these policies chooses what to read per step


def test_dense_bytes_are_what_a_dense_cache_holds(decode_rows, tokens):
    dense = decode_rows[2]["dense"]
    # 2 layers x 2 kv heads x head_dim 16 x (K + V) x fp32, per prompt token; measured from the DynamicCache
    assert dense["kv_bytes_dense"] == dense["kv_bytes_kept"] == dense["kv_bytes_cpu"] == tokens * 2 * 2 * 16 * 2 * 4
    assert dense["compression"] == 1.0


def test_budget_at_or_above_context_decodes_like_dense(decode_rows, tokens):
    rows = decode_rows[2]
    for label in ("streaming_llm:budget=4096", f"snapkv:budget={tokens}"):
        assert rows[label]["output"] == rows["dense"]["output"]
        assert rows[label]["compression"] == 1.0
        assert rows[label]["kv_bytes_kept"] == rows[label]["kv_bytes_dense"] == rows["dense"]["kv_bytes_dense"]
    skipped = rows[f"snapkv:budget={tokens + 1}"]  # a compression target above the prompt is no measurement
    assert skipped["correct"] is None and "exceeds the context" in skipped["skipped"]


def test_real_budget_compresses_by_measured_bytes(decode_rows, tokens):
    rows = decode_rows[2]
    for label in ("streaming_llm:budget=64", "snapkv:budget=64:window=16"):
        r = rows[label]
        assert r["kv_bytes_kept"] == 64 * 2 * 2 * 16 * 2 * 4  # 64 tokens per kv head left after compression
        assert r["compression"] == pytest.approx(tokens / 64, rel=1e-3) and r["compression"] > 4
        assert r["kv_bytes_cpu"] < rows["dense"]["kv_bytes_cpu"] / 4
    assert rows["streaming_llm:budget=64"]["kv_bytes_cpu_max"] == rows["streaming_llm:budget=64"]["kv_bytes_cpu"]


def test_query_aware_and_quantised_policies(model, tmp_path):
    decodes = [parse_decode("quest:budget=32:page_size=16:dense_layers=0"), parse_decode("quest:budget=4096"),
               parse_decode("kivi:bits=8:residual=32")]
    jobs = runner.grid(["passkey"], [LENGTH], [0.5], [DENSE], decodes=decodes)
    rows = {r["decode"]: r for r in runner.run(jobs, model, ByteTokenizer(), tmp_path / "q.jsonl", model_name="t",
                                                progress=False)}
    sparse, full = rows["quest:budget=32:dense_layers=0:page_size=16"], rows["quest:budget=4096"]
    assert full["kv_read_fraction"] == 1.0 and full["compression"] == 1.0  # Quest keeps everything
    # 2 pages of 16 out of ~300 tokens per kv head, plus every page's bounds scored each step (1/16 of the slots)
    assert 1 / 16 <= sparse["kv_scoring_fraction"] < 1.2 / 16  # pages up to the capacity (a little slack)
    assert 0.05 < sparse["kv_read_fraction"] - sparse["kv_scoring_fraction"] < 0.13
    assert full["kv_scoring_fraction"] == 0.0  # a budget covering the context scores nothing
    assert sparse["compression"] == 1.0 and sparse["kv_bytes_cpu"] > sparse["kv_bytes_kept"]  # + page bounds
    kivi = rows["kivi:bits=8:residual=32"]  # keeps every token, quantised: compression from the payload bytes
    assert kivi["kv_read_fraction"] is None and 2 < kivi["compression"] < 4 and kivi["output"]


def test_resume_skips_finished_decode_rows(model, decode_rows):
    jobs, out, rows = decode_rows
    assert runner.run(jobs, model, ByteTokenizer(), out, model_name="tiny", progress=False) == []
    kept = runner.rows_of(jobs, out, model_name="tiny", dtype=model.dtype)
    assert sorted(map(runner.row_key, kept)) == sorted(map(runner.row_key, rows.values()))
    # a row written before decode policies existed has no "decode" field: it is the dense-cache row
    old = dict(rows["dense"])
    del old["decode"]
    assert runner.row_key(old) == runner.row_key(rows["dense"])
    legacy = out.with_name("legacy.jsonl")
    legacy.write_text(json.dumps(old) + "\n")
    dense_job = [j for j in jobs if j.decode.name == "dense"]
    assert runner.run(dense_job, model, ByteTokenizer(), legacy, model_name="tiny", progress=False) == []


def test_bad_decode_specs_fail_clearly():
    with pytest.raises(ValueError, match="unknown policy 'nosuch'; valid decode policies: dense, .*snapkv"):
        parse_decode("nosuch")
    with pytest.raises(ValueError, match="unknown policy 'streaming'"):  # a prefill pattern is no decode policy
        parse_decode("streaming")
    with pytest.raises(ValueError, match=r"'snapkv' has no knob\(s\) \['budgt'\]; its knobs: budget, window"):
        parse_decode("snapkv:budgt=64")
    with pytest.raises(ValueError, match="not a valid configuration: budget: 16 is smaller than the observation"):
        parse_decode("snapkv:budget=16")
    with pytest.raises(ValueError, match="knob=value"):
        parse_decode("snapkv:64")
    with pytest.raises(ValueError, match="takes no knobs"):
        parse_decode("dense:budget=3")
    with pytest.raises(ValueError, match="none of the decode policies .* takes a budget"):
        expand_budgets([parse_decode("kivi")], [64])


def test_budgets_expand_only_policies_with_a_budget():
    specs = [parse_decode(d) for d in ("dense", "snapkv:window=16", "kivi:bits=8", "streaming_llm:budget=100")]
    labels = [s.label for s in expand_budgets(specs, [64, 128])]
    assert labels == ["dense", "snapkv:budget=64:window=16", "snapkv:budget=128:window=16", "kivi:bits=8",
                      "streaming_llm:budget=100"]
    with pytest.raises(ValueError, match="budget: 16 is smaller"):  # every expanded spec is validated
        expand_budgets([parse_decode("snapkv")], [16])


@pytest.mark.parametrize("argv, message", [
    (["--decode", "nosuch"], "--decode 'nosuch': decode: unknown policy 'nosuch'; valid decode policies"),
    (["--decode", "snapkv:budgt=1"], "--decode 'snapkv:budgt=1': decode: 'snapkv' has no knob"),
    (["--methods", "snapkv"], "--methods: .*'snapkv'.* are decode policies; pass them with --decode"),
    (["--decode", "kivi", "--budgets", "64"], "--budgets '64': budgets: none of the decode policies"),
    (["--decode", "snapkv", "--kv-setting", "blind"], "--kv-setting 'blind': expected a comma list of aware, "),
])
def test_cli_rejects_bad_specs_before_loading_a_model(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(["eval", "--out", str(tmp_path / "x.jsonl"), *argv])


def test_report_decode_table_and_compression_plot(decode_rows, tmp_path):
    rows = list(decode_rows[2].values())
    legacy = [{k: v for k, v in r.items() if k != "decode"} for r in rows if r["decode"] == "dense"]
    md = report.markdown(rows + legacy)
    assert "| method | decode | acc % | compression | kv read | kept KiB | decode ms/token | tokens/s | samples |" in md
    assert "| dense | dense |" in md and "| dense | streaming_llm:budget=64 |" in md
    assert "dense + snapkv:budget=64:window=16" in md  # the accuracy tables name (method + decode)
    assert "| dense | dense | 0.0 | 1.00x | – |" in md or "| dense | dense | 100.0 | 1.00x | – |" in md
    text = report.write_html(rows, tmp_path / "r.html").read_text()
    assert text.count("data:image/png;base64") == 3 and (tmp_path / "r.compression.png").exists()


def test_question_agnostic_compresses_the_context_before_the_question(model, tokens, tmp_path):
    """Agnostic: the context alone is prefilled and compressed, then the question is fed (it is kept whole, after
    the compressed context); with a budget covering the context it decodes exactly what the dense cache does."""
    tok = ByteTokenizer()
    sample = make_sample(tok, "passkey", LENGTH, 0.5)
    question, context = len(tok(sample.question).input_ids), len(tok(sample.context).input_ids)
    assert context + question == tokens and question > 0
    decodes = [parse_decode(d) for d in ("dense", "snapkv:budget=64:window=16", f"snapkv:budget={context}")]
    jobs = runner.grid(["passkey"], [LENGTH], [0.5], [DENSE], decodes=decodes, settings=["aware", "agnostic"])
    assert len(jobs) == 5  # the dense cache keeps everything: no agnostic job for it
    rows = {(r["decode"], r["kv_setting"]): r for r in runner.run(jobs, model, tok, tmp_path / "a.jsonl",
                                                                   model_name="t", progress=False)}
    per_token = 2 * 2 * 16 * 2 * 4  # layers x kv heads x head_dim x (K + V) x fp32
    assert rows[("snapkv:budget=64:window=16", "aware")]["kv_bytes_kept"] == 64 * per_token
    assert rows[("snapkv:budget=64:window=16", "agnostic")]["kv_bytes_kept"] == (64 + question) * per_token
    whole = rows[(f"snapkv:budget={context}", "agnostic")]
    assert whole["output"] == rows[("dense", "aware")]["output"] and whole["compression"] == 1.0
    assert runner.run(jobs, model, tok, tmp_path / "a.jsonl", model_name="t", progress=False) == []  # resumable
    md = report.markdown(list(rows.values()))
    assert "| dense | snapkv:budget=64:window=16 (question-agnostic) |" in md
    with pytest.raises(ValueError, match="settings: expected some of"):
        runner.grid(["passkey"], [LENGTH], [0.5], [DENSE], decodes=decodes, settings=["blind"])


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(False, False, torch.float32), (True, False, torch.bfloat16),
                                                         (False, True, torch.bfloat16)])
def test_model_dtype_auto_follows_the_cpus_bf16_units(amx, avx512_bf16, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert model_dtype("auto", "cpu") == expected
    assert model_dtype("auto", "cuda") == torch.bfloat16 and model_dtype("fp16", "cpu") == torch.float16
