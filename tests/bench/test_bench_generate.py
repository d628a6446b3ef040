"""``bench generate``'s same-run check of every layer's kernel read against the float32 torch read: about the
reference's own rounding when the read is right, far above it when it is wrong (the Triton kernel interpreted on CPU,
on a tiny fp32 model, one evicting and one page-selecting policy)."""

from __future__ import annotations

import copy

import pytest

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


POLICIES = ["snapkv:budget=24:window=8", "quest:budget=32:page_size=16:dense_layers=0:share_group=True"]


@pytest.mark.parametrize("decode", POLICIES)
def test_a_right_read_passes(model, decode):
    assert _check(model, decode) <= READ_CHECK_MAX


@pytest.mark.parametrize("decode", POLICIES)
def test_a_wrong_read_fails(model, monkeypatch, decode):
    real = kernel_read.kernel_read
    monkeypatch.setattr(cache_mod, "kernel_read", lambda q, layer, scale, sel=None: real(q, layer, scale))  # no pages
    if decode.startswith("snapkv"):  # every slot is read anyway: break the read another way
        monkeypatch.setattr(cache_mod, "kernel_read", lambda q, *a: real(q, *a) * 1.01)
    assert _check(model, decode) > READ_CHECK_MAX
