"""Method specs as the eval names them: ``dense``, ``name`` or ``name:knob=value:knob=value`` (knob values parsed
as Python literals), resolved against the registry so unknown names and knobs fail before any model runs."""

from __future__ import annotations

import ast
import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field

from longattn.methods.registry import get


@dataclass(frozen=True)
class MethodSpec:
    """One method at one configuration; ``label`` is its stable name in result rows."""

    name: str
    knobs: dict = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(self.label)

    @property
    def label(self) -> str:
        return ":".join([self.name] + [f"{k}={v}" for k, v in sorted(self.knobs.items())])

    @property
    def family(self) -> str:
        return "dense" if self.name == "dense" else get(self.name).family


def parse_method(text: str) -> MethodSpec:
    """``streaming:num_sinks=4:window=1024`` → MethodSpec; checks the name and knob names against the registry."""
    name, *parts = text.strip().split(":")
    knobs = {}
    for part in parts:
        if "=" not in part:
            raise ValueError(f"method: expected knob=value after ':' in {text!r}, got {part!r}")
        key, value = part.split("=", 1)
        try:
            knobs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            knobs[key] = value
    spec = MethodSpec(name, knobs)
    if name != "dense":
        entry = get(name)  # unknown names list the valid ones
        params = inspect.signature(entry.factory).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(knobs) - set(params))
            if unknown:
                raise ValueError(f"method: {name!r} has no knob(s) {unknown}; its knobs: {', '.join(params)}")
    return spec


@contextlib.contextmanager
def applied(model, spec: MethodSpec, impl: str = "auto") -> Iterator:
    """The model with ``spec`` patched in for the duration; yields the patch handle (its state records density)."""
    from longattn.hf.patch import patch

    family = spec.family
    if family == "decode":
        handle = patch(model, decode=spec.name, impl=impl, **spec.knobs)
    else:
        handle = patch(model, prefill=None if family == "dense" else spec.name, impl=impl, **spec.knobs)
    try:
        yield handle
    finally:
        handle.restore()
