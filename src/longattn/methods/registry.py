"""The method registry: every pattern or method registers under a unique name and family, so the CLI, eval
and bench find it by name. ``longattn methods`` prints ``table()``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

FAMILIES = ("pattern", "prefill", "decode", "linear")


@dataclass(frozen=True)
class Entry:
    """One registered method: what builds it and where it comes from."""

    name: str
    family: str
    paper: str
    impls: tuple[str, ...]
    factory: Callable


_REGISTRY: dict[str, Entry] = {}


def register(name: str, family: str, *, paper: str, impls: tuple[str, ...] = ("triton", "flex", "reference")):
    """Decorator registering a factory (function or class) under ``name``."""
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")

    def deco(factory: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise ValueError(f"name: {name!r} is already registered by {_REGISTRY[name].factory!r}")
        _REGISTRY[name] = Entry(name, family, paper, tuple(impls), factory)
        return factory

    return deco


def _load_builtin() -> None:
    """Import the modules that register the built-in patterns and methods (each file registers itself)."""
    import importlib
    import pkgutil

    from longattn.methods import decode, linear, patterns, prefill  # noqa: F401  (patterns registers on import)

    for package in (prefill, decode, linear):
        for info in pkgutil.iter_modules(package.__path__):
            if info.name != "base":
                importlib.import_module(f"{package.__name__}.{info.name}")


def get(name: str) -> Entry:
    """The entry registered as ``name``; unknown names list the valid ones."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"method: unknown name {name!r}; valid names: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def names(family: str | None = None) -> list[str]:
    """Registered names, optionally of one family."""
    _load_builtin()
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def table() -> list[dict[str, str]]:
    """Rows for ``longattn methods``: name, family, paper, supported impls."""
    return [{"name": e.name, "family": e.family, "paper": e.paper, "impls": ", ".join(e.impls)}
            for e in (get(n) for n in names())]
