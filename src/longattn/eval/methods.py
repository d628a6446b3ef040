"""Method specs as the eval names them: ``dense``, ``name`` or ``name:knob=value:knob=value`` (knob values parsed
as Python literals), resolved against the registry so unknown names and knobs fail before any model runs.
Prefill specs (``--methods``: patterns and prefill methods) and decode specs (``--decode``: KV-cache policies) use
the same syntax; ``dense`` is the plain model in both."""

from __future__ import annotations

import ast
import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field

from longattn.methods.registry import get, names


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


DENSE = MethodSpec("dense")


def _split(text: str, what: str) -> MethodSpec:
    name, *parts = text.strip().split(":")
    knobs = {}
    for part in parts:
        if "=" not in part:
            raise ValueError(f"{what}: expected knob=value after ':' in {text!r}, got {part!r}")
        key, value = part.split("=", 1)
        try:
            knobs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            knobs[key] = value
    return MethodSpec(name, knobs)


def _check_knobs(spec: MethodSpec, what: str) -> None:
    params = inspect.signature(get(spec.name).factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(spec.knobs) - set(params))
        if unknown:
            raise ValueError(f"{what}: {spec.name!r} has no knob(s) {unknown}; its knobs: {', '.join(params)}")


def parse_method(text: str) -> MethodSpec:
    """``streaming:num_sinks=4:window=1024`` → MethodSpec; checks the name and knob names against the registry."""
    spec = _split(text, "method")
    if spec.name != "dense":
        get(spec.name)  # unknown names list the valid ones
        _check_knobs(spec, "method")
    return spec


def parse_decode(text: str) -> MethodSpec:
    """A decode-policy spec, ``dense`` (the model's own dense cache) or ``snapkv:budget=512:window=32``: the name
    must be a registered decode policy, the knobs its constructor's, and the policy must build with them (so bad
    values and missing calibration files fail before any model runs)."""
    return _checked_decode(_split(text, "decode"))


def _checked_decode(spec: MethodSpec) -> MethodSpec:
    if spec.name == "dense":
        if spec.knobs:
            raise ValueError(f"decode: 'dense' takes no knobs, got {spec.label!r}")
        return spec
    valid = names("decode")
    if spec.name not in valid:
        raise ValueError(f"decode: unknown policy {spec.name!r}; valid decode policies: dense, {', '.join(valid)}")
    _check_knobs(spec, "decode")
    try:
        get(spec.name).factory(**spec.knobs)
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"decode: {spec.label!r} is not a valid configuration: {e}") from e
    return spec


def takes_budget(spec: MethodSpec) -> bool:
    """Whether a decode spec's policy has a ``budget`` knob (``--budgets`` expands only those)."""
    return spec.name != "dense" and "budget" in inspect.signature(get(spec.name).factory).parameters


def expand_budgets(specs: list[MethodSpec], budgets: list[int] | None) -> list[MethodSpec]:
    """Each decode spec once per budget (``budget=b`` added) when its policy takes a budget and the spec does not
    set one itself; other specs (dense, KIVI, explicit budgets) pass through once. Every result is re-validated."""
    if not budgets:
        return list(dict.fromkeys(specs))
    if not any(takes_budget(s) for s in specs):
        raise ValueError(f"budgets: none of the decode policies {[s.label for s in specs]} takes a budget")
    out = []
    for s in specs:
        if takes_budget(s) and "budget" not in s.knobs:
            out.extend(_checked_decode(MethodSpec(s.name, s.knobs | {"budget": b})) for b in budgets)
        else:
            out.append(s)
    return list(dict.fromkeys(out))


@contextlib.contextmanager
def applied(model, spec: MethodSpec, impl: str = "auto", decode: MethodSpec = DENSE) -> Iterator:
    """The model with prefill ``spec`` and decode policy ``decode`` patched in for the duration; yields the patch
    handle (its state records density; ``handle.cache()`` builds the policy's cache when ``decode`` is not dense).
    A decode policy given as the prefill spec is taken as ``decode`` (with dense prefill)."""
    from longattn.hf.patch import patch

    if spec.family == "decode":
        if decode.name != "dense":
            raise ValueError(f"method: {spec.label!r} is a decode policy and decode={decode.label!r} is given too")
        spec, decode = DENSE, spec
    policy = None if decode.name == "dense" else decode.name
    handle = patch(model, prefill=None if spec.family == "dense" else spec.name, decode=policy, impl=impl,
                   decode_config=dict(decode.knobs) if policy else None, **spec.knobs)
    try:
        yield handle
    finally:
        handle.restore()
