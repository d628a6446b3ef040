"""Task generators: each builds a prompt of a target token length with needles at given depths, and the strings
the model's answer must contain. Deterministic from (task, length, depth, seed); templates follow RULER (Hsieh et
al. 2024) and the passkey test (Mohtashami & Jaggi 2023), phrased as continuations so small base-ish models can
answer."""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from longattn.eval.tasks.haystack import sentences

INTRO = ("There is important information hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lively", "misty", "noble", "odd", "plain", "quiet", "rusty", "silent", "tame", "urban", "vivid",
              "wary", "young", "zesty", "bold", "crisp", "dark", "early", "fierce")
NOUNS = ("otter", "lantern", "meadow", "harbor", "falcon", "glacier", "orchard", "pebble", "quarry", "raven",
         "saddle", "thimble", "violin", "walrus", "anchor", "beacon", "canyon", "dolphin", "ember", "fountain",
         "garnet", "heron", "island", "jasmine", "kettle", "ladder", "marble", "nectar", "oyster", "pillar")


@dataclass(frozen=True)
class Sample:
    """One prompt and the strings a correct answer contains (score = fraction of them found)."""

    task: str
    prompt: str
    answers: tuple[str, ...]
    max_new_tokens: int
    meta: dict = field(default_factory=dict)
    question: str = ""  # the prompt's closing question (a suffix of it); "" when the task has none

    @property
    def context(self) -> str:
        """The prompt before its question: what a question-agnostic KV policy compresses."""
        return self.prompt[: len(self.prompt) - len(self.question)]


def score(sample: Sample, output: str) -> float:
    """RULER's string match: fraction of the expected answers that appear in the output."""
    return sum(a.lower() in output.lower() for a in sample.answers) / len(sample.answers)


@functools.lru_cache(maxsize=8)
def _sentence_tokens(tokenizer, haystack: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    sents = tuple(sentences(haystack))
    counts = tuple(len(ids) for ids in tokenizer([" " + s for s in sents], add_special_tokens=False).input_ids)
    return sents, counts


def _context(tokenizer, haystack: str, n_tokens: int, needles: list[tuple[float, str]], seed: float) -> str:
    """Haystack sentences filling ``n_tokens`` tokens, with each (depth, needle) inserted at that fraction."""
    sents, counts = _sentence_tokens(tokenizer, haystack)
    start = random.Random(seed).randrange(len(sents)) if haystack != "noise" else 0
    chosen, used, i = [], 0, start
    while used + counts[i % len(sents)] <= n_tokens:
        chosen.append(sents[i % len(sents)])
        used += counts[i % len(sents)]
        i += 1
    for depth, needle in sorted(needles, key=lambda d: -d[0]):  # deepest first keeps earlier indices valid
        chosen.insert(round(depth * len(chosen)), needle)
    return " ".join(chosen)


def _fit(tokenizer, build: Callable[[int], str], length: int) -> str:
    """Build a prompt whose token count is close to ``length`` (≤ length): size the haystack by the overhead."""
    probe = build(0)
    overhead = len(tokenizer(probe).input_ids)
    if overhead >= length:
        raise ValueError(f"length: {length} tokens cannot hold the task's needles and question ({overhead} tokens)")
    return build(length - overhead)


def _key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _distinct_keys(rng: random.Random, n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        k = _key(rng)
        if k not in keys:
            keys.append(k)
    return keys


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def passkey(tok, length: int, depth: float, rng: random.Random, haystack: str) -> Sample:
    key = _number(rng, 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question = "\nWhat is the pass key? The pass key is"

    ctx = rng.random()

    def build(n: int) -> str:
        return INTRO + _context(tok, haystack, n, [(depth, needle)], ctx) + question
    return Sample("passkey", _fit(tok, build, length), (key,), 8, question=question)


def niah_single(tok, length: int, depth: float, rng: random.Random, haystack: str) -> Sample:
    key, value = _key(rng), _number(rng)
    question = (f"\nWhat is the special magic number for {key} mentioned in the provided text? "
                f"The special magic number for {key} mentioned in the provided text is")

    ctx = rng.random()

    def build(n: int) -> str:
        return INTRO + _context(tok, haystack, n, [(depth, _needle(key, value))], ctx) + question
    return Sample("niah_single", _fit(tok, build, length), (value,), 12, question=question)


def niah_multikey(tok, length: int, depth: float, rng: random.Random, haystack: str, distractors: int = 3) -> Sample:
    keys = _distinct_keys(rng, distractors + 1)
    values = [_number(rng) for _ in keys]
    needles = [(depth, _needle(keys[0], values[0]))] + [(rng.random(), _needle(k, v))
                                                         for k, v in zip(keys[1:], values[1:], strict=True)]
    question = (f"\nWhat is the special magic number for {keys[0]} mentioned in the provided text? "
                f"The special magic number for {keys[0]} mentioned in the provided text is")

    ctx = rng.random()

    def build(n: int) -> str:
        return INTRO + _context(tok, haystack, n, needles, ctx) + question
    return Sample("niah_multikey", _fit(tok, build, length), (values[0],), 12, question=question)


def niah_multivalue(tok, length: int, depth: float, rng: random.Random, haystack: str, n_values: int = 4) -> Sample:
    key = _key(rng)
    values = [_number(rng) for _ in range(n_values)]
    needles = [(depth, _needle(key, values[0]))] + [(rng.random(), _needle(key, v)) for v in values[1:]]
    question = (f"\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
                f"The special magic numbers for {key} mentioned in the provided text are")

    ctx = rng.random()

    def build(n: int) -> str:
        return INTRO + _context(tok, haystack, n, needles, ctx) + question
    return Sample("niah_multivalue", _fit(tok, build, length), tuple(values), 12 * n_values, question=question)


def niah_multiquery(tok, length: int, depth: float, rng: random.Random, haystack: str, n_queries: int = 4) -> Sample:
    keys = _distinct_keys(rng, n_queries)
    values = [_number(rng) for _ in keys]
    needles = [(depth, _needle(keys[0], values[0]))] + [(rng.random(), _needle(k, v))
                                                         for k, v in zip(keys[1:], values[1:], strict=True)]
    listed = ", ".join(keys[:-1]) + f" and {keys[-1]}"
    question = (f"\nWhat are all the special magic numbers for {listed} mentioned in the provided text? "
                f"The special magic numbers for {listed} mentioned in the provided text are")

    ctx = rng.random()

    def build(n: int) -> str:
        return INTRO + _context(tok, haystack, n, needles, ctx) + question
    return Sample("niah_multiquery", _fit(tok, build, length), tuple(values), 12 * n_queries, question=question)


def variable_tracking(tok, length: int, depth: float, rng: random.Random, haystack: str, hops: int = 4) -> Sample:
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    span = (1.0 - depth) / (hops + 1)
    needles = [(depth + i * span, c) for i, c in enumerate(chain)]
    question = (f"\nFind all variables that are assigned the value {value} in the text above. Answer: According to "
                f"the chain of variable assignment in the text above, {hops + 1} variables are assigned the value "
                f"{value}, they are:")

    ctx = rng.random()

    def build(n: int) -> str:
        return INTRO + _context(tok, haystack, n, needles, ctx) + question
    return Sample("variable_tracking", _fit(tok, build, length), tuple(names), 8 * (hops + 1), question=question)


def _word_list(tok, length: int, make_words: Callable[[int], list[str]], question: str, top: int
               ) -> tuple[str, tuple[str, ...]]:
    """A numbered word list of about ``length`` tokens, and its ``top`` most frequent words."""
    built: dict[int, list[str]] = {}

    def build(n: int) -> str:
        built[n] = make_words(n)
        return "Below is a numbered list of words.\n" + " ".join(f"{i + 1}. {w}" for i, w in enumerate(built[n])) + \
            question
    n_words = length // 4
    for _ in range(8):  # tokens per word vary with the numbering: shrink until the prompt fits
        prompt = build(n_words)
        n_tokens = len(tok(prompt).input_ids)
        if n_tokens <= length:
            break
        n_words = int(n_words * length / n_tokens * 0.995)
    else:
        raise ValueError(f"length: could not fit a word list into {length} tokens")
    words = built[n_words]
    ranked = Counter(words).most_common()
    if len(ranked) > top and ranked[top - 1][1] == ranked[top][1]:
        raise ValueError(f"length: {length} tokens is too short for a well-defined top-{top} word list")
    return prompt, tuple(w for w, _ in ranked[:top])


def common_words(tok, length: int, depth: float, rng: random.Random, haystack: str, top: int = 10) -> Sample:
    """RULER's common-words extraction: ``top`` words repeated often among words that appear once."""
    vocab = [f"{a}{b}" for a in ADJECTIVES for b in NOUNS]
    rng.shuffle(vocab)
    common, rare = vocab[:top], vocab[top:]
    seed = rng.random()
    question = (f"\nQuestion: What are the {top} most common words in the above list? Answer: The top {top} words "
                f"that appear most often in the list are:")

    def words(n: int) -> list[str]:
        repeats = max(2, n // (4 * top))
        out = (common * repeats + rare[: max(0, n - repeats * top)])[:n]
        random.Random(seed).shuffle(out)
        return out
    prompt, answers = _word_list(tok, length, words, question, top)
    return Sample("common_words", prompt, answers, 8 * top, question=question)


def frequent_words(tok, length: int, depth: float, rng: random.Random, haystack: str, top: int = 3) -> Sample:
    """RULER's frequent-words extraction: coded words drawn from a Zipf distribution; name the ``top`` most
    frequent."""
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)) for _ in range(400)]
    weights = [1.0 / (i + 1) ** 1.2 for i in range(len(vocab))]
    seed = rng.random()
    question = (f"\nQuestion: What are the {top} most frequently appeared coded words in the above list? Answer: "
                f"According to the list above, the {top} most frequently appeared words are:")

    def words(n: int) -> list[str]:
        return random.Random(seed).choices(vocab, weights, k=n)
    prompt, answers = _word_list(tok, length, words, question, top)
    return Sample("frequent_words", prompt, answers, 6 * top, question=question)


TASKS: dict[str, Callable[..., Sample]] = {
    "passkey": passkey,
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
}
DEPTHLESS = ("common_words", "frequent_words")


def make_sample(tokenizer, task: str, length: int, depth: float, *, seed: int = 0, haystack: str = "noise") -> Sample:
    """The sample for (task, length, depth, seed): same inputs give the same prompt on every machine."""
    if task not in TASKS:
        raise ValueError(f"task: unknown {task!r}; valid: {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: expected a fraction in [0, 1], got {depth!r}")
    rng = random.Random(f"{task}|{length}|{depth}|{seed}|{haystack}")
    sample = TASKS[task](tokenizer, length, depth, rng, haystack)
    return Sample(sample.task, sample.prompt, sample.answers, sample.max_new_tokens,
                  {"depth": depth, "seed": seed, "haystack": haystack}, sample.question)
