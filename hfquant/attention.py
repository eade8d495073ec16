"""Attention in the rotated space of a rotated quantized KV cache.

A QuantizedKVCache with ``rotation="hadamard"`` stores each head's keys and values rotated
by an orthonormal R (hfquant.algorithms.rotation.HadamardRotation). Since (Rq).(Rk) = q.k and
softmax(...) (V R^T) = (softmax(...) V) R^T, attention can run on the rotated states as they
are stored if the query is rotated first and the output rotated back: two transforms of one
token per step, where rotating the cache back costs a transform of every stored token every
step (measured 0.84x of the unrotated cache's decode at 8k tokens of context that way, 0.94x
this way: docs/benchmarks.md, kv-cache).

``ROTATED_SDPA`` is transformers' sdpa attention with that wrapper, registered in its
AttentionInterface (and sdpa's mask function under the same name) when the first model is
switched to it (``enable_rotated_attention``; a hfquant model whose ``kv_cache_bits`` cache
rotates is switched at load). The cache hands rotated
keys and values (each carrying its rotation as ``_hfquant_rotation``) only to a model whose
config names this implementation; any other tensor passes through unchanged.
"""
from __future__ import annotations

import logging

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

logger = logging.getLogger("hfquant")

ROTATED_SDPA = "hfquant_rotated_sdpa"
ROTATION_ATTR = "_hfquant_rotation"


def rotated_sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """sdpa_attention_forward on (R q, R K, R V) for keys/values a rotated cache marked, the
    output rotated back (R^T); unmarked keys/values (a float cache, cross-attention) as sdpa."""
    key_rot = getattr(key, ROTATION_ATTR, None)
    value_rot = getattr(value, ROTATION_ATTR, None)
    if key_rot is not None:
        query = key_rot.forward(query)
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if value_rot is not None:
        out = value_rot.inverse(out)  # [batch, tokens, heads, head_dim]: the last dimension is the head's
    return out, weights


def _register() -> None:
    """Registers ROTATED_SDPA with transformers (once; at the first model that runs it, so that
    importing hfquant changes nothing in transformers)."""
    AttentionInterface.register(ROTATED_SDPA, rotated_sdpa_attention_forward)
    AttentionMaskInterface.register(ROTATED_SDPA, sdpa_mask)


def uses_rotated_attention(config) -> bool:
    """Whether a model of this config runs ROTATED_SDPA (a cache may then hand rotated states)."""
    return getattr(config, "_attn_implementation", None) == ROTATED_SDPA


def enable_rotated_attention(model) -> bool:
    """Switches a model running transformers' sdpa attention to ROTATED_SDPA (the same
    attention for any unrotated cache); returns whether the model now runs it."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return False
    if uses_rotated_attention(config):
        return True
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    _register()
    try:
        model.set_attn_implementation(ROTATED_SDPA)
    except (ValueError, ImportError, AttributeError) as e:  # a model class that refuses custom attention
        logger.debug("hfquant: the rotated KV cache rotates back in the cache (%s)", e)
        return False
    return uses_rotated_attention(config)
