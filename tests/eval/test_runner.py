"""The eval loop on a tiny random Llama: rows carry every field, reruns skip finished rows, torn lines are ignored,
densities are what the patch recorded."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from longattn.eval import report, runner  # noqa: E402
from longattn.eval.methods import parse_method  # noqa: E402
from tests.eval.chartok import ByteTokenizer  # noqa: E402

FIELDS = {"task", "haystack", "length", "depth", "seed", "method", "model", "dtype", "family", "config", "tokens",
          "density", "correct", "answers", "output", "prefill_ms", "decode_ms_per_token", "peak_mem_mb", "device"}


def test_rows_resume_and_density(model, tmp_path):
    out = tmp_path / "eval.jsonl"
    methods = [parse_method("dense"), parse_method("streaming:num_sinks=4:window=128")]
    jobs = runner.grid(["passkey", "common_words"], [700], [0.2, 0.8], methods)
    assert len(jobs) == 2 * (2 + 1)  # depthless common_words runs once per length
    rows = runner.run(jobs, model, ByteTokenizer(), out, model_name="tiny", progress=False)
    assert len(rows) == len(jobs) and all(set(r) >= FIELDS for r in rows)
    dense = [r for r in rows if r["method"] == "dense"]
    stream = [r for r in rows if r["method"].startswith("streaming")]
    assert all(r["density"] == 1.0 for r in dense)
    # 4 sinks + a 128 window over ~700 tokens keeps far less than causal attention
    assert all(0.1 < r["density"] < 0.5 for r in stream)
    assert {r["family"] for r in stream} == {"pattern"} and stream[0]["config"] == {"num_sinks": 4, "window": 128}
    with out.open("a") as f:
        f.write('{"task": "passkey", "torn')  # a run killed mid-write
    again = runner.run(jobs, model, ByteTokenizer(), out, model_name="tiny", progress=False)
    assert again == []
    kept = runner.rows_of(jobs, out, model_name="tiny", dtype=model.dtype)
    assert sorted(map(runner.row_key, kept)) == sorted(map(runner.row_key, rows))
    more = runner.grid(["passkey"], [700], [0.5], methods[:1])
    assert len(runner.run(more, model, ByteTokenizer(), out, model_name="tiny", progress=False)) == 1


def test_dense_rows_equal_unpatched_greedy_decoding(model):
    """The eval's prefill + greedy loop through longattn dense decodes what the stock model decodes."""
    job = runner.grid(["passkey"], [400], [0.5], [parse_method("dense")])[0]
    tok = ByteTokenizer()
    from longattn.eval.methods import applied

    with applied(model, job.method) as handle:
        row = runner.run_one(job, model, tok, handle.state)
    from longattn.eval.tasks import make_sample

    ids = tok(make_sample(tok, "passkey", 400, 0.5).prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert row["output"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_report_tables_and_html(tmp_path):
    rows = [{"task": t, "length": n, "depth": d, "method": m, "correct": c, "density": dens, "prefill_ms": 10.0}
            for t in ("passkey", "common_words") for n in (1000, 2000) for d in (0.1, 0.9)
            for m, c, dens in (("dense", 1.0, 1.0), ("streaming", 0.0, 0.3))]
    md = report.markdown(rows)
    assert "| dense | 100.0 (1.00) | 100.0 (1.00) | 100.0 | 8 |" in md
    assert "| streaming | 1000 | 0 | 0 |" in md
    path = report.write_html(rows, tmp_path / "r.html")
    text = path.read_text()
    assert text.count("data:image/png;base64") == 2 and "<table>" in text
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")
    assert len(report.load_rows([tmp_path / "rows.jsonl"])) == len(rows)


def test_method_specs_are_checked_before_anything_runs():
    assert parse_method("minference_block:top_k=8").knobs == {"top_k": 8}
    with pytest.raises(ValueError, match="unknown name 'nosuch'; valid names: .*streaming"):
        parse_method("nosuch")
    with pytest.raises(ValueError, match="has no knob"):
        parse_method("streaming:num_sink=4")
    with pytest.raises(ValueError, match="knob=value"):
        parse_method("streaming:4")
