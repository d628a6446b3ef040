"""``bench generate``'s same-run check of the kernel read against the torch read: near zero when the read is right,
about the logits' spread when it is wrong (the Triton kernel interpreted on CPU, on a tiny model)."""

from __future__ import annotations

import copy

import pytest
import torch

from longattn.bench.generate import READ_CHECK_MAX, read_check
from longattn.eval.methods import applied, parse_decode, parse_method
from longattn.hf import cache as cache_mod
from longattn.hf import kernel_read
from longattn.hf.compat import cache_kwargs
from tests.methods.decode.helpers import prompt, tiny_llama


@pytest.fixture
def model(monkeypatch):
    monkeypatch.setattr(kernel_read, "KERNEL_DEVICES", {"cuda", "cpu"})
    return copy.deepcopy(tiny_llama(2, 4, 2))


def _check(model, decode: str) -> float:
    with applied(model, parse_method("dense"), decode=parse_decode(decode)) as handle:
        return read_check(model, prompt(60), lambda: cache_kwargs(model, handle.cache()))


def test_a_right_read_passes(model):
    assert _check(model, "snapkv:budget=24:window=8") < 1e-4 < READ_CHECK_MAX


def test_a_wrong_read_fails(model, monkeypatch):
    monkeypatch.setattr(cache_mod, "kernel_read", lambda q, *a: torch.zeros_like(q))
    assert _check(model, "snapkv:budget=24:window=8") > READ_CHECK_MAX
