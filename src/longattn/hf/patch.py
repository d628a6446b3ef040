"""``longattn.patch``: route a stock transformers model's attention through longattn, using transformers' own
extension points (AttentionInterface / AttentionMaskInterface registries), with no forked model code."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from longattn import masks
from longattn.api import IMPLS, _to_block_sparse, attention
from longattn.hf.cache import LongattnCache, active_layer, attend_cached
from longattn.hf.compat import cache_kwargs
from longattn.masks.block_sparse import BlockSparse
from longattn.masks.core import MaskMod
from longattn.methods.prefill.base import PrefillMethod
from longattn.methods.registry import get, names

ATTN_NAME = "longattn"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma")


@dataclass
class PatchState:
    """What one patched model runs: the prefill pattern (None = dense) and the backend."""

    prefill: MaskMod | None
    impl: str
    previous: str
    method: PrefillMethod | None = None  # a dynamic method estimates blocks from each layer's real q and k
    policy: object | None = None  # a decode policy (methods/decode), used through a LongattnCache
    _shifted: tuple[int, MaskMod | None] = (0, None)
    _kept: list[Tensor] = field(default_factory=list)  # per prefill layer call, on the device (read when asked)
    last_blocks: BlockSparse | None = None  # the last prefill layer's blocks (attention fidelity reads them)

    def record(self, bs: BlockSparse, Sq: int, Skv: int) -> None:
        """Note one prefill layer's kept query-key pairs as a fraction of causal attention's (eval reports it).
        Kept as a device scalar: reading it here would stall the layer on the device."""
        causal_pairs = Sq * (Skv - Sq) + Sq * (Sq + 1) / 2
        self.last_blocks = bs
        self._kept.append(bs.kept_fraction * (Sq * Skv / causal_pairs))

    @property
    def densities(self) -> list[float]:
        """Kept pairs / causal pairs of every prefill layer call since the last ``clear_densities``."""
        return [float(x) for x in self._kept]

    def clear_densities(self) -> None:
        self._kept.clear()

    def pattern_at(self, offset: int) -> MaskMod | None:
        """The prefill pattern for queries starting at absolute position ``offset``; one object per offset so
        every layer of a forward reuses the same BlockSparse."""
        if self.prefill is None:
            return None
        if self._shifted[0] != offset or self._shifted[1] is None:
            self._shifted = (offset, self.prefill.shifted(offset))
        return self._shifted[1]


_states: dict[int, PatchState] = {}  # id(model config) -> state; configs are unhashable, entries die with them


class Patched:
    """Handle returned by ``patch``; ``restore()`` (or leaving the ``with`` block) puts the old attention back."""

    def __init__(self, model, state: PatchState):
        self.model, self.state = model, state

    def restore(self) -> None:
        _set_attn_implementation(self.model, self.state.previous)
        _states.pop(id(self.model.config), None)
        self.model.__dict__.pop("generate", None)

    def cache(self, *, offload: str | None = None, auto_compress: bool = True) -> LongattnCache:
        """A fresh LongattnCache for this model's decode policy (pass it with ``compat.cache_kwargs``: ``cache=``,
        ``past_key_values=`` on older transformers).
        offload: None, "values" or "all" (held in CPU memory). auto_compress=False: the question-agnostic setting,
        call ``cache.compress()`` yourself after a context-only prefill."""
        if self.state.policy is None:
            raise ValueError("decode: this model was patched without a decode policy; patch(model, decode=...)")
        cfg = self.model.config
        return LongattnCache(self.state.policy, cfg.num_hidden_layers, offload=offload, auto_compress=auto_compress,
                             config_key=id(cfg))

    def __enter__(self):
        return self.model

    def __exit__(self, *exc) -> None:
        self.restore()


def patch(model, prefill: str | None = None, decode: str | None = None, *, impl: str = "auto",
          decode_config: dict | None = None, **config) -> Patched:
    """Route every attention layer of ``model`` through ``longattn.attention``.

    prefill: a registered pattern or prefill method (``longattn methods``) built with ``**config`` as its knobs,
    or None for dense attention; it shapes multi-token (prompt) forwards, while single-token decoding steps read
    the whole cache. decode: a registered decode policy built with ``decode_config`` as its knobs;
    then ``model.generate(...)`` runs on a fresh ``LongattnCache`` unless a cache is given (build one
    with ``handle.cache(...)``). impl: the backend, as in ``longattn.attention``. Usable as
    ``with longattn.patch(model, ...):`` to restore the model afterwards.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model: unsupported model type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    policy = None
    if decode is not None:
        valid = names("decode")
        if decode not in valid:
            raise ValueError(f"decode: unknown policy {decode!r}; valid: {', '.join(valid)}")
        if decode_config is not None and not isinstance(decode_config, dict):
            raise TypeError(f"decode_config: expected a dict of policy knobs, got {type(decode_config).__name__}")
        policy = get(decode).factory(**(decode_config or {}))
        policy.bind(model.config)
    elif decode_config:
        raise ValueError(f"decode_config: knobs {sorted(decode_config)} given without a decode policy")
    pattern = method = None
    if prefill is not None:
        entry = get(prefill)
        if entry.family == "pattern":
            pattern = entry.factory(**config)
        elif entry.family == "prefill":
            method = entry.factory(**config)
        else:
            raise ValueError(f"prefill: {prefill!r} is a {entry.family} method, not a prefill pattern or method")
    elif config:
        raise ValueError(f"config: knobs {sorted(config)} given without a prefill method")
    _register()
    state = PatchState(pattern, impl, model.config._attn_implementation, method, policy)
    key = id(model.config)
    _states[key] = state
    weakref.finalize(model.config, _states.pop, key, None)
    _set_attn_implementation(model, ATTN_NAME)
    handle = Patched(model, state)
    if policy is not None:
        _wrap_generate(model, handle)
    return handle


def _wrap_generate(model, handle: Patched) -> None:
    """Shadow ``model.generate`` on the instance so a plain call decodes on a fresh LongattnCache."""
    generate = type(model).generate

    def generate_with_cache(*args, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is None:
            kwargs.update(cache_kwargs(model, handle.cache()))
        return generate(model, *args, **kwargs)

    model.generate = generate_with_cache


def _set_attn_implementation(model, name: str) -> None:
    for cfg in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        cfg._attn_implementation = name


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, longattn_attention_forward)
    # sdpa's mask format: None when plain causal without padding, else a bool [B, 1, Sq, Skv] tensor.
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def longattn_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                               dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """The function transformers calls per layer: (B, H, Sq, D) in, (B, Sq, H, D) out, no attention weights."""
    state = _states.get(id(module.config))
    if state is None:
        raise RuntimeError("longattn attention called on a model that was not patched (or was restored)")
    if dropout:
        raise ValueError(f"dropout: longattn attention has no dropout, got {dropout} (call model.eval())")
    if kwargs.get("softcap") is not None:
        raise ValueError("softcap: logit soft-capping is not supported by longattn attention")
    layer_idx = getattr(module, "layer_idx", 0)
    cache, layer = active_layer(module.config, layer_idx, key) if state.policy is not None else (None, None)
    if layer is not None and not layer.first_prefill:  # decoding (or a later chunk) on the policy's cache
        policy = cache.policy
        selection = policy.select(layer_idx, query, layer) if query.shape[2] == 1 else None
        out = attend_cached(query, layer, selection, scale=scaling, attention_mask=attention_mask,
                            sliding_window=kwargs.get("sliding_window"))
        policy.after_step(layer_idx, query, layer)
        layer.after_read()
        return out.transpose(1, 2).contiguous(), None
    out = _uncached(state, module, query, key, value, attention_mask, scaling, kwargs)
    if layer is not None:  # end of the first prefill: capture the prompt queries a policy needs, maybe compress
        cache.after_prefill(layer_idx, query)
    return out, None


def _uncached(state: PatchState, module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
              scaling: float | None, kwargs: dict) -> Tensor:
    """Attention over the given keys/values: dense, a static pattern, or a dynamic prefill method."""
    Sq, Skv = query.shape[2], key.shape[2]
    offset = Skv - Sq  # cached decoding / chunked prefill: queries are the last Sq positions
    if state.method is not None and Sq > 1:  # dynamic prefill; decoding steps read the whole cache
        if attention_mask is not None or (kwargs.get("sliding_window") or Skv) < Skv:
            raise ValueError("prefill: dynamic prefill methods take unpadded prompts on models without a sliding "
                             "window; run padded sequences one at a time")
        bs = state.method.estimate(query, key, layer=getattr(module, "layer_idx", 0))
        state.record(bs, Sq, Skv)
        out = attention(query, key, value, mask=bs, scale=scaling, impl=state.impl)
        return out.transpose(1, 2).contiguous()
    mask = state.pattern_at(offset) if Sq > 1 else None  # prefill patterns shape prompts; decoding reads it all
    window = kwargs.get("sliding_window")
    if window and int(window) < Skv:  # the model's own sliding window (Mistral, Qwen2), when it restricts
        mask = masks.sliding_window(int(window), offset=offset) if mask is None else mask & masks.sliding_window(
            int(window), offset=offset)
    if attention_mask is not None:  # padding (or any explicit mask): kept exactly
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        allowed = allowed[:, :, -Sq:, -Skv:]

        def padding(b, h, q, kv):
            return allowed[b, 0, q, kv]

        mask = MaskMod(padding, name="padding") if mask is None else mask & MaskMod(padding, name="padding")
        causal = False  # the explicit mask already encodes causality
    else:
        causal = True
    if mask is not None and Sq > 1:  # build the blocks here (cached across layers) to report the retained work
        mask = _to_block_sparse(mask, causal, query, key, (128, 128), None, None)
        causal = False  # the BlockSparse holds causality
        state.record(mask, Sq, Skv)
    out = attention(query, key, value, mask=mask, causal=causal, scale=scaling, impl=state.impl)
    return out.transpose(1, 2).contiguous()
