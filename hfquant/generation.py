"""The cache ``generate`` gives a hfquant model when the caller passes none.

transformers' default ``DynamicCache`` concatenates each step's keys and values onto the
whole layer (``torch.cat``): every decode step copies every layer's cache, so a step's cost
grows with the context (at 512 tokens of context on the default model that copy is about a
seventh of a CPU decode step). A hfquant model's ``generate`` instead gets

* the ``QuantizedKVCache`` its config asks for (``HfQuantConfig(kv_cache_bits=...)``), or
* transformers' own ``DynamicCache`` whose full-attention layers are ``PreallocatedLayer``:
  the same keys and values, appended in place into buffers sized for the generation.

Sliding-window, linear-attention and other layers stay transformers' own. A cache passed by
the caller (``cache=...``), ``cache_implementation=...`` and ``use_cache=False`` are left
alone, and ``hfquant.settings(generate_cache="transformers")`` turns the choice off.
"""
from __future__ import annotations

import inspect
import logging
import types

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

from .runtime import settings

logger = logging.getLogger("hfquant")

# tokens added beyond what a step needs when a layer's buffers grow (besides growing by half)
GROW_TOKENS = 256


class PreallocatedLayer(DynamicLayer):
    """transformers' ``DynamicLayer`` (full attention) whose ``keys``/``values`` are views of
    buffers with room for more tokens: an update writes the new tokens in place instead of
    concatenating. ``capacity`` is the length the generation is expected to reach (the first
    buffers hold it when it is within ``GROW_TOKENS`` or half again of what is stored); full
    buffers grow by half. Whatever replaces ``keys``/``values`` from outside (crop, a beam
    search reorder, a batch selection) is copied into fresh buffers at the next update."""

    def __init__(self, capacity: int = 0):
        super().__init__()
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ValueError(f"PreallocatedLayer: capacity must be an int >= 0, got {capacity!r}")
        self.capacity = capacity
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _views_of_buffers(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Whether keys/values are still the leading tokens of the buffers and the new states fit their layout."""
        if self._buffers is None:
            return False
        for held, buf, new in zip((self.keys, self.values), self._buffers, (key_states, value_states)):
            if (held.data_ptr() != buf.data_ptr() or held.stride() != buf.stride()
                    or held.shape[:-2] != buf.shape[:-2] or held.shape[-1] != buf.shape[-1]
                    or new.shape[:-2] != buf.shape[:-2] or new.shape[-1] != buf.shape[-1]
                    or new.dtype != buf.dtype or new.device != buf.device):
                return False
        return True

    def _new_capacity(self, total: int) -> int:
        grow = max(total + GROW_TOKENS, total + total // 2)
        return min(grow, self.capacity) if self.capacity >= total else grow

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past = self.get_seq_length()
        total = past + key_states.shape[-2]
        for held, new in ((self.keys, key_states), (self.values, value_states)):
            if past and (held.shape[:-2] != new.shape[:-2] or held.shape[-1] != new.shape[-1]):
                raise ValueError(f"PreallocatedLayer: states of shape {list(new.shape)} cannot be appended to a "
                                 f"cache of shape {list(held.shape)} (only the token dimension, -2, may differ)")
        if not self._views_of_buffers(key_states, value_states) or total > self._buffers[0].shape[-2]:
            cap = self._new_capacity(total)
            bufs = tuple(new.new_empty((*new.shape[:-2], cap, new.shape[-1]))
                         for new in (key_states, value_states))
            if past:
                bufs[0][..., :past, :].copy_(self.keys)
                bufs[1][..., :past, :].copy_(self.values)
            self._buffers = bufs
        kb, vb = self._buffers
        kb[..., past:total, :].copy_(key_states)
        vb[..., past:total, :].copy_(value_states)
        self.keys, self.values = kb[..., :total, :], vb[..., :total, :]
        return self.keys, self.values

    def reset(self) -> None:
        self._buffers = None
        super().reset()


def _preallocate(cache: DynamicCache, capacity: int) -> DynamicCache:
    """Swaps the cache's empty plain full-attention layers for PreallocatedLayers (in place)."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and not layer.is_initialized:
            cache.layers[i] = PreallocatedLayer(capacity)
    return cache


def generate_cache(model, default, max_cache_length: int):
    """The cache a hfquant model's generate uses in place of ``default``, the one transformers
    made: the configured QuantizedKVCache, or ``default`` with PreallocatedLayers."""
    from .kv_cache import build_quantized_cache, kv_cache_settings

    kv = kv_cache_settings(model)
    if kv is not None:
        try:
            return build_quantized_cache(model.config, kv)
        except ValueError:  # a cache the model cannot use: the load warned (quantizer._finish)
            pass
    capacity = max_cache_length if isinstance(max_cache_length, int) and max_cache_length > 0 else 0
    if type(default) is DynamicCache:
        return _preallocate(default, capacity)
    if type(default) is EncoderDecoderCache and type(default.self_attention_cache) is DynamicCache:
        _preallocate(default.self_attention_cache, capacity)  # cross-attention is written once
    return default


_PREPARE = "_prepare_cache_for_generation"
_NEEDED = ("generation_config", "model_kwargs", "max_cache_length")


def bind_generate_cache(model) -> bool:
    """Makes ``model.generate`` use ``generate_cache`` when the caller gives no cache (see the
    module docstring). Returns whether it is bound: False for a model without generate or a
    transformers release whose ``_prepare_cache_for_generation`` differs (generate then keeps
    transformers' cache, which is correct, only slower)."""
    original = getattr(type(model), _PREPARE, None)
    if original is None or not hasattr(model, "generate"):
        return False
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):
        return False
    if any(name not in signature.parameters for name in _NEEDED):
        logger.debug("hfquant: generate keeps transformers' cache (unknown %s signature)", _PREPARE)
        return False

    def prepare(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        gen_config, model_kwargs = bound.arguments["generation_config"], bound.arguments["model_kwargs"]
        if settings.generate_cache != "auto" or getattr(gen_config, "cache_implementation", None) not in (None,
                                                                                                         "dynamic"):
            return result
        for key in ("cache", "past_key_values"):
            made = model_kwargs.get(key)
            if made is not None and not getattr(made, "_is_user_defined", False):
                model_kwargs[key] = generate_cache(self, made, bound.arguments["max_cache_length"])
                break
        return result

    object.__setattr__(model, _PREPARE, types.MethodType(prepare, model))
    return True


def generate_cache_bound(model) -> bool:
    """Whether bind_generate_cache bound this model."""
    return _PREPARE in vars(model)
