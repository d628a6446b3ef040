"""transformers renamed the cache argument and output field (``past_key_values`` -> ``cache``, deprecated in the
5.2x releases, removed from ``forward`` in 5.40); the GPU images carry an older release. These helpers speak
whichever name the installed release expects."""

from __future__ import annotations

import inspect
from functools import lru_cache


@lru_cache
def _cache_arg(model_cls: type) -> str:
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def cache_kwargs(model, kv_cache) -> dict:
    """``{name: kv_cache}`` for ``model(...)`` / ``model.generate(...)`` under the installed release's name."""
    return {_cache_arg(type(model)): kv_cache}


def output_cache(out):
    """The cache a model call returned (``out.cache`` or, on older releases, ``out.past_key_values``)."""
    name = "cache" if "cache" in out else "past_key_values"
    return out[name]
