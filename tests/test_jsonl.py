"""Appends to JSONL result files after a killed run: the torn line is closed, the next row lands whole."""

from __future__ import annotations

import json

from longattn.bench.timing import append_jsonl
from longattn.jsonl import open_append


def test_append_after_a_torn_line(tmp_path):
    out = tmp_path / "sub" / "rows.jsonl"
    append_jsonl(out, {"a": 1})
    with out.open("a") as f:
        f.write('{"a": 2, "b"')  # killed mid-row
    append_jsonl(out, {"a": 3})
    with open_append(out) as f:
        f.write(json.dumps({"a": 4}) + "\n")
    lines = out.read_text().splitlines()
    assert [json.loads(x)["a"] for x in (lines[0], lines[2], lines[3])] == [1, 3, 4] and lines[1] == '{"a": 2, "b"'


def test_open_append_creates_file_and_folder(tmp_path):
    out = tmp_path / "new" / "rows.jsonl"
    with open_append(out) as f:
        f.write("{}\n")
    assert out.read_text() == "{}\n"
