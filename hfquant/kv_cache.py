"""Quantized KV cache for ``generate`` (KIVI-style: keys per channel, values per token).

    cache = QuantizedKVCache(model.config, bits=4, group_size=64, residual_length=128)
    model.generate(**inputs, cache=cache, max_new_tokens=256)

Each attention layer keeps its newest ``residual_length`` tokens (or up to one group more)
in full precision; older tokens are flushed into packed int8/int4/int2 stores in blocks of
``group_size`` tokens (a block is one key group: keys are quantized per channel over the
tokens of a block, values per token over groups of ``group_size`` channels). Quantization
happens once per token, straight into preallocated stores (``hfquant::kv_append``); each
step the stores are dequantized into the attention's dtype (``hfquant::kv_dequantize_into``)
in front of the full-precision window. Beam search reorders the stores exactly (rows of
codes move, nothing is requantized).

With ``rotation="hadamard"`` (the default at 4 bits) the tokens are rotated per head by a
seeded randomized Hadamard matrix (``hfquant::hadamard_transform``) before they are quantized,
keys then per token like values, and rotated back after dequantization: exact in float, it
spreads the outlier channels of keys over the head. A model running hfquant's rotated attention
(hfquant/attention.py; a hfquant model whose kv_cache_bits cache rotates does) reads them as
stored instead: the window is rotated too, and the query and the output are rotated in place of
the whole store.

The cache has one layer per decoder layer, of the kind transformers' DynamicCache builds for
the config's ``layer_types``: full attention; sliding (and chunked) attention, whose store
drops the whole blocks that fell out of the window, so a layer never holds more than
``sliding_window + residual_length + group_size`` tokens; linear-attention / mamba state, kept
by transformers' own full-precision layer; layers with both. Encoder-decoder models take an
``EncoderDecoderCache`` from ``quantized_cache(model)`` (quantized self-attention, float
cross-attention).
"""
from __future__ import annotations

import logging

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicSlidingWindowLayer, EncoderDecoderCache

try:
    from transformers.cache_utils import BaseQuantizedLayer
except ImportError:  # older transformers: hfquant imports, only this cache is unavailable

    class BaseQuantizedLayer:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            raise ImportError("hfquant.QuantizedKVCache needs a transformers release with "
                              "cache_utils.BaseQuantizedLayer (5.24 has it)")

try:
    from transformers.cache_utils import DummyLayer, LinearAttentionLayer
except ImportError:  # older transformers: only the linear-attention / hybrid / dummy layers are unavailable

    class LinearAttentionLayer:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            raise ImportError("hfquant.QuantizedKVCache: linear-attention, hybrid and KV-sharing layers need a "
                              "transformers release with cache_utils.LinearAttentionLayer (5.25 has it)")

    DummyLayer = LinearAttentionLayer  # type: ignore[misc]

from . import ops
from .algorithms.rotation import HadamardRotation, hadamard_factorization
from .attention import ROTATED_SDPA, ROTATION_ATTR, uses_rotated_attention

logger = logging.getLogger("hfquant")

SUPPORTED_BITS = (2, 4, 8)
ROTATIONS = ("auto", "hadamard", None)
# "auto" rotates at these bits (measured: docs/benchmarks.md, quantized KV cache)
AUTO_ROTATION_BITS = (4,)
# the default group size is the largest of these that divides head_dim
DEFAULT_GROUP_SIZES = (64, 32, 16, 8)


def check_kv_cache_args(bits, group_size, residual_length, rotation="auto") -> None:
    """Checks the settings; group_size None means the default for the model's head_dim."""
    if rotation not in ROTATIONS:
        raise ValueError(f"QuantizedKVCache: rotation={rotation!r} is not supported (use one of {ROTATIONS})")
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"QuantizedKVCache: bits={bits!r} is not supported (use one of {SUPPORTED_BITS})")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise ValueError(f"QuantizedKVCache: group_size={group_size!r} must be a positive integer")
    if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
        raise ValueError(f"QuantizedKVCache: residual_length={residual_length!r} must be an integer >= 0")


def default_group_size(head_dim: int) -> int:
    """The largest of 64, 32, 16, 8 that divides head_dim (64 -> 64, 96 -> 32, 80 -> 16)."""
    for g in DEFAULT_GROUP_SIZES:
        if head_dim % g == 0:
            return g
    raise ValueError(f"QuantizedKVCache: no default group size divides head_dim={head_dim} (the default is the "
                     f"largest of {DEFAULT_GROUP_SIZES} dividing it); set kv_cache_group_size (group_size) to a "
                     "divisor of head_dim")


def _check_group_size(group_size: int, head_dim: int) -> None:
    if head_dim % group_size:
        raise ValueError(f"QuantizedKVCache: group_size={group_size} (kv_cache_group_size) does not divide "
                         f"head_dim={head_dim}; leave kv_cache_group_size unset for the largest of "
                         f"{DEFAULT_GROUP_SIZES} dividing head_dim, or use a divisor of it")


class QuantizedKVLayer(BaseQuantizedLayer):
    """One attention layer's cache: packed key/value stores plus a full-precision window.

    With ``sliding_window`` it is a sliding (or chunked) attention layer that behaves as
    transformers' DynamicSlidingWindowLayer: ``update`` returns the last ``sliding_window - 1``
    past tokens and the new ones, ``get_mask_sizes`` says so, and the store drops the whole
    blocks that no later step can see."""

    def __init__(self, bits: int = 4, group_size: int = 64, residual_length: int = 128,
                 sliding_window: int | None = None, rotation: HadamardRotation | None = None):
        super().__init__()
        check_kv_cache_args(bits, group_size, residual_length)
        if group_size is None:
            raise ValueError("QuantizedKVLayer: group_size must be set (QuantizedKVCache picks the default)")
        if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                           or sliding_window < 1):
            raise ValueError(f"QuantizedKVCache: sliding_window={sliding_window!r} must be a positive integer")
        self.bits = bits
        self.group_size = group_size
        self.residual_length = residual_length
        self.sliding_window = sliding_window
        self.rotation = rotation
        # with a rotation: hand the states to attention as stored, rotated (the model runs
        # hfquant.attention.ROTATED_SDPA, which rotates the query and the output instead)
        self.rotated_reads = False
        self._qlen = 0  # tokens in the quantized stores
        self._stores: dict[str, list[torch.Tensor]] = {}  # "k"/"v" -> [codes, scales, mins]

    @property
    def is_sliding(self) -> bool:
        return self.sliding_window is not None

    # BaseQuantizedLayer's hooks: this layer quantizes into its stores in update() instead.
    def _quantize(self, tensor):
        raise NotImplementedError("QuantizedKVLayer quantizes into its stores in update()")

    def _dequantize(self, q_tensor):
        raise NotImplementedError("QuantizedKVLayer dequantizes its stores in update()")

    # -- storage ----------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _check_group_size(self.group_size, key_states.shape[-1])
        _check_group_size(self.group_size, value_states.shape[-1])
        if self.rotation is not None and not key_states.shape[-1] == value_states.shape[-1] == self.rotation.n:
            raise ValueError(f"QuantizedKVCache: the rotation is of size {self.rotation.n}, the keys/values have "
                             f"head_dim {key_states.shape[-1]}/{value_states.shape[-1]}")
        self.device = key_states.device
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self._qlen = 0
        self._stores = {}
        self.is_initialized = True

    @property
    def key_per_channel(self) -> bool:
        """Rotated states spread a channel's outliers over the head: keys are then quantized per
        token (as values); without rotation per channel (KIVI)."""
        return self.rotation is None

    def _layouts(self) -> tuple[tuple[str, bool], tuple[str, bool]]:
        """(store, quantized per channel over blocks of tokens?) for keys and values."""
        return ("k", self.key_per_channel), ("v", False)

    def _param_rows(self, tokens: int, per_channel: bool) -> int:
        """Rows of scales/mins for `tokens` tokens: one per group of tokens (keys) or per token."""
        return tokens // self.group_size if per_channel else tokens

    def _capacity(self) -> int:
        return self._stores["k"][0].shape[-2] if self._stores else 0

    def _grow(self, like_k: torch.Tensor, like_v: torch.Tensor, need: int) -> None:
        """Makes room for ``need`` tokens (x1.25 steps, whole groups), keeping what is stored."""
        cap = self._capacity()
        if need <= cap:
            return
        g = self.group_size
        new_cap = -(-max(need, cap + cap // 4) // g) * g
        for (key, per_channel), like in zip(self._layouts(), (like_k, like_v)):
            *lead, _, D = like.shape
            p_rows = self._param_rows(new_cap, per_channel)
            p_cols = D if per_channel else D // g
            new = [torch.zeros(*lead, new_cap, D * self.bits // 8, dtype=torch.uint8, device=like.device),
                   torch.zeros(*lead, p_rows, p_cols, dtype=torch.float16, device=like.device),
                   torch.zeros(*lead, p_rows, p_cols, dtype=torch.float16, device=like.device)]
            if cap:
                old = self._stores[key]
                q_rows = self._param_rows(self._qlen, per_channel)
                new[0][..., :self._qlen, :] = old[0][..., :self._qlen, :]
                new[1][..., :q_rows, :] = old[1][..., :q_rows, :]
                new[2][..., :q_rows, :] = old[2][..., :q_rows, :]
            self._stores[key] = new

    def _dequantized(self, key: str, total: int, per_channel: bool) -> torch.Tensor:
        """A [..., total, D] buffer whose first _qlen tokens hold the dequantized store."""
        like = self.keys if key == "k" else self.values
        out = torch.empty(*like.shape[:-2], total, like.shape[-1], dtype=like.dtype, device=like.device)
        if self._qlen:
            c, s, m = self._stores[key]
            rot = None if self.rotated_reads else self.rotation
            if rot is not None and rot.mix is None:  # 2^k: rotated back in the dequantizer's pass
                ops.kv_dequantize_rotated_into(c, s, m, out, self._qlen, self.bits, self.group_size,
                                               rot.signs.to(out.device))
                return out
            ops.kv_dequantize_into(c, s, m, out, self._qlen, self.bits, self.group_size, per_channel)
            if rot is not None:
                rot.inverse_(out[..., :self._qlen, :])
        return out

    # -- the cache protocol -------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.rotated_reads:  # the window and the returned states are rotated too
            key_states, value_states = self.rotation.forward(key_states), self.rotation.forward(value_states)
        t = key_states.shape[-2]
        past = self.cumulative_length
        self.cumulative_length += t
        q, r = self._qlen, self.keys.shape[-2]
        total = q + r + t
        keys = self._dequantized("k", total, self.key_per_channel)
        values = self._dequantized("v", total, False)
        keys[..., q:q + r, :] = self.keys
        keys[..., q + r:, :] = key_states
        values[..., q:q + r, :] = self.values
        values[..., q + r:, :] = value_states
        # Flush whole groups of the oldest full-precision tokens, keeping >= residual_length.
        g = self.group_size
        flush = max(0, (r + t - self.residual_length) // g * g)
        # A sliding layer's next step sees the last sliding_window - 1 tokens: whole blocks
        # before them are dropped (those not yet quantized are never quantized).
        drop = 0
        if self.sliding_window is not None:
            drop = min(max(0, total - self.sliding_window + 1) // g, (q + flush) // g) * g
        kept = q - min(drop, q)  # stored tokens that stay
        if kept < q:
            self._drop_front(q - kept)
        first = max(q, drop)  # buffer index of the first token to quantize now
        n = q + flush - first
        if n > 0:
            self._grow(keys, values, kept + n)
            for (key, per_channel), src in zip(self._layouts(), (keys, values)):
                c, s, m = self._stores[key]
                block = src[..., first:q + flush, :]
                if self.rotation is not None and not self.rotated_reads:
                    block = self.rotation.forward(block)
                ops.kv_append(block, c, s, m, kept, self.bits, g, per_channel)
        self._qlen = kept + max(n, 0)
        # the window is copied out so that the returned buffers are not kept alive
        self.keys = keys[..., q + flush:, :].clone()
        self.values = values[..., q + flush:, :].clone()
        if self.sliding_window is not None:
            visible = min(past, self.sliding_window - 1) + t
            keys, values = keys[..., total - visible:, :], values[..., total - visible:, :]
        if self.rotated_reads:
            setattr(keys, ROTATION_ATTR, self.rotation)
            setattr(values, ROTATION_ATTR, self.rotation)
        return keys, values

    def _drop_front(self, n: int) -> None:
        """Drops the oldest n (whole groups of) tokens of the stores."""
        q = self._qlen
        for key, per_channel in self._layouts():
            c, s, m = self._stores[key]
            rows, first = self._param_rows(q, per_channel), self._param_rows(n, per_channel)
            c[..., :q - n, :] = c[..., n:q, :].clone()
            s[..., :rows - first, :] = s[..., first:rows, :].clone()
            m[..., :rows - first, :] = m[..., first:rows, :].clone()
        self._qlen = q - n

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.sliding_window is None:
            return super().get_mask_sizes(query_length)
        return DynamicSlidingWindowLayer.get_mask_sizes(self, query_length)

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def stored_tokens(self) -> int:
        """Tokens held: the quantized store and the full-precision window."""
        return self._qlen + (self.keys.shape[-2] if self.is_initialized else 0)

    def _select(self, fn) -> None:
        """Applies fn (a batch-dimension selection) to the stores and the window."""
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self._stores = {k: [fn(t) for t in v] for k, v in self._stores.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices, ...])

    def reset(self) -> None:
        super().reset()
        self._qlen = 0
        self._stores = {}

    def offload(self):
        return  # the stores stay where they are

    def prefetch(self):
        return

    # -- accounting ----------------------------------------------------------------------------
    def memory_bytes(self, allocated: bool = False) -> int:
        """Bytes of this layer's cache: the used part of the stores plus the window (or, with
        allocated=True, the whole allocated capacity)."""
        total = 0
        if self.is_initialized:
            total += self.keys.nbytes + self.values.nbytes
        for key, per_channel in self._layouts():
            if key not in self._stores:
                continue
            c, s, m = self._stores[key]
            if allocated:
                total += c.nbytes + s.nbytes + m.nbytes
            else:
                rows = self._param_rows(self._qlen, per_channel)
                total += c[..., :self._qlen, :].nbytes + 2 * s[..., :rows, :].nbytes
        return total


class QuantizedHybridKVLayer(LinearAttentionLayer, QuantizedKVLayer):
    """A layer with a linear-attention (mamba) state, kept in full precision as transformers
    keeps it, and quantized attention keys/values (full or sliding)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, bits: int = 4, group_size: int = 64, residual_length: int = 128,
                 sliding_window: int | None = None, number_of_states: int = 1,
                 rotation: HadamardRotation | None = None):
        QuantizedKVLayer.__init__(self, bits, group_size, residual_length, sliding_window, rotation)
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

    def lazy_initialization(self, *args, **kwargs) -> None:
        # the attention update passes (keys, values); the linear-attention state updates pass keywords
        if len(args) == 2 and not kwargs:
            QuantizedKVLayer.lazy_initialization(self, *args)
        elif not args:
            LinearAttentionLayer.lazy_initialization(self, **kwargs)

    def reset(self) -> None:
        LinearAttentionLayer.reset(self)
        QuantizedKVLayer.reset(self)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        LinearAttentionLayer.reorder_cache(self, beam_idx)
        QuantizedKVLayer.reorder_cache(self, beam_idx)

    def get_seq_length(self) -> int:
        return QuantizedKVLayer.get_seq_length(self)

    def get_max_length(self) -> int:
        return QuantizedKVLayer.get_max_length(self)


# layer types (transformers' names) that QuantizedKVCache serves
_SLIDING = ("sliding_attention", "chunked_attention")
_LINEAR = ("linear_attention", "conv")
_HYBRID = ("hybrid", "hybrid_sliding")
SERVED_LAYER_TYPES = ("full_attention", *_SLIDING, *_LINEAR, *_HYBRID, "dummy")


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _model_type(config) -> str:
    return getattr(_text_config(config), "model_type", None) or getattr(config, "model_type", None) \
        or type(config).__name__


def cache_plan(config) -> tuple[int, list[tuple[str, dict]]]:
    """(head_dim, [(layer_type, layer kwargs)] per decoder layer) as transformers' DynamicCache
    reads them from the config; raises, naming the model type and the layer type, for a layer
    this cache does not serve."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = _text_config(config)
    model_type = _model_type(config)
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if heads and hidden else None)
    if not layers or not head_dim:
        raise ValueError(f"QuantizedKVCache: a {model_type} model cannot use it (no num_hidden_layers / head_dim in "
                         "its config)")
    try:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
    except AttributeError:  # a config without per-layer settings: all full attention
        layer_types, layer_kwargs = ["full_attention"] * layers, [{}] * layers
    layer_types, layer_kwargs = list(layer_types), list(layer_kwargs)
    decoder_layers = getattr(text, "num_decoder_layers", None)
    if getattr(config, "is_encoder_decoder", False) and decoder_layers and set(layer_types) == {"full_attention"}:
        layer_types, layer_kwargs = ["full_attention"] * decoder_layers, [{}] * decoder_layers
    for i, layer_type in enumerate(layer_types):
        if layer_type not in SERVED_LAYER_TYPES:
            raise ValueError(f"QuantizedKVCache: a {model_type} model cannot use it (layer {i} is {layer_type!r}; "
                             f"it serves {', '.join(SERVED_LAYER_TYPES)})")
    return head_dim, list(zip(layer_types, layer_kwargs))


def _make_layer(layer_type: str, kwargs: dict, bits: int, group_size: int, residual_length: int,
                rotation: HadamardRotation | None):
    window = kwargs.get("sliding_window") if layer_type in (*_SLIDING, "hybrid_sliding") else None
    if layer_type in ("full_attention", *_SLIDING):
        return QuantizedKVLayer(bits, group_size, residual_length, window, rotation)
    if layer_type in _HYBRID:
        return QuantizedHybridKVLayer(bits, group_size, residual_length, window, kwargs.get("number_of_states", 1),
                                      rotation)
    if layer_type in _LINEAR:
        return LinearAttentionLayer(number_of_states=kwargs.get("number_of_states", 1))
    return DummyLayer()


class QuantizedKVCache(Cache):
    """A transformers Cache whose attention layers store keys and values quantized to ``bits``.

    Its layers follow the config's layer types (see the module docstring); a layer type it
    does not serve is an error naming the model type and the layer type.

    Args:
        config: the model's config (layers, head_dim, layer types, sliding_window).
        bits: 8, 4 or 2.
        group_size: channels per value group and tokens per key group (must divide head_dim);
            None (default): the largest of 64, 32, 16, 8 dividing head_dim.
        residual_length: newest tokens kept in full precision (flushed in whole groups).
        rotation: "hadamard": keys and values are rotated per head by a seeded randomized
            Hadamard matrix before they are quantized (and back when read: exact in float;
            a model running hfquant.attention.ROTATED_SDPA, as a hfquant model with
            kv_cache_bits does, reads them rotated and rotates its query and output instead),
            which spreads outlier channels; keys are then quantized per token. None: no
            rotation, keys per channel. "auto" (default): "hadamard" at 4 bits where head_dim
            has a Hadamard size (2^k, or 2^k times a Paley order), None otherwise (at 2 bits
            per-token rotated keys measured worse than per-channel ones).
    """

    def __init__(self, config, bits: int = 4, group_size: int | None = None, residual_length: int = 128,
                 rotation: str | None = "auto"):
        check_kv_cache_args(bits, group_size, residual_length, rotation)
        head_dim, plan = cache_plan(config)
        if group_size is None:
            group_size = default_group_size(head_dim)
        _check_group_size(group_size, head_dim)
        if rotation == "auto":
            rotation = "hadamard" if bits in AUTO_ROTATION_BITS and hadamard_factorization(head_dim) else None
        elif rotation == "hadamard" and not hadamard_factorization(head_dim):
            raise ValueError(f"QuantizedKVCache: rotation='hadamard' has no Hadamard matrix for head_dim={head_dim} "
                             "(sizes 2^k and 2^k times a Paley order are served); use rotation=None")
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.rotation = rotation
        rot = HadamardRotation(head_dim, seed=0) if rotation == "hadamard" else None
        super().__init__(layers=[_make_layer(t, kw, bits, group_size, residual_length, rot) for t, kw in plan])
        # a model running hfquant's rotated attention reads the rotated states as stored
        self._attn_config = _text_config(config)
        self.rotated_reads = rot is not None and uses_rotated_attention(self._attn_config)
        for layer in self.layers:
            if isinstance(layer, QuantizedKVLayer):
                layer.rotated_reads = self.rotated_reads
        # an encoder-decoder model given this cache alone would append its cross-attention
        # keys/values to the self-attention layers: refused unless for_encoder_decoder made it
        self._encoder_decoder = _model_type(config) if getattr(config, "is_encoder_decoder", False) else None

    @classmethod
    def for_encoder_decoder(cls, config, bits: int = 4, group_size: int | None = None,
                            residual_length: int = 128, rotation: str | None = "auto") -> EncoderDecoderCache:
        """The cache of an encoder-decoder model: an EncoderDecoderCache of a QuantizedKVCache
        (self-attention) and a float DynamicCache (cross-attention keys/values, written once)."""
        cache = cls(config, bits, group_size, residual_length, rotation)
        cache._encoder_decoder = None
        return EncoderDecoderCache(cache, DynamicCache(config=config))

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self._encoder_decoder:
            raise ValueError(f"QuantizedKVCache: a {self._encoder_decoder} model is an encoder-decoder: pass "
                             "hfquant.quantized_cache(model) or QuantizedKVCache.for_encoder_decoder(config, ...) "
                             "(an EncoderDecoderCache), not a QuantizedKVCache alone")
        if self.rotated_reads and not uses_rotated_attention(self._attn_config):
            raise ValueError(f"QuantizedKVCache: this cache hands rotated states to {ROTATED_SDPA} attention, but "
                             f"the model now runs {getattr(self._attn_config, '_attn_implementation', None)!r}: "
                             "make a new cache after changing the attention implementation")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def memory_bytes(self, allocated: bool = False) -> int:
        """Bytes of keys and values held by the attention layers (see QuantizedKVLayer.memory_bytes);
        linear-attention states are not counted."""
        return sum(layer.memory_bytes(allocated) for layer in self.layers if isinstance(layer, QuantizedKVLayer))


def kv_cache_settings(model) -> tuple[int, int | None, int, str | None] | None:
    """(bits, group_size, residual_length, rotation) of the KV cache that the model's hfquant
    quantization_config asks for (kv_cache_bits, ...), or None; group_size None is the default
    for the model's head_dim."""
    q = getattr(getattr(model, "config", None), "quantization_config", None)
    if q is None:
        return None
    get = q.get if isinstance(q, dict) else (lambda key, default=None: getattr(q, key, default))
    if get("quant_method") != "hfquant" or get("kv_cache_bits") is None:
        return None
    return (get("kv_cache_bits"), get("kv_cache_group_size"), get("kv_cache_residual_length", 128),
            get("kv_cache_rotation", "auto"))


def warn_unserved(config, bits, why: str) -> None:
    logger.warning("hfquant: kv_cache_bits=%s is not used for this %s model, generate keeps transformers' default "
                   "cache: %s", bits, _model_type(config), why)


def quantized_cache(model) -> Cache | None:
    """A fresh QuantizedKVCache with the settings the model's quantization_config holds
    (HfQuantConfig(kv_cache_bits=...)), for one generate call, or None when it holds none:
    ``model.generate(ids, cache=hfquant.quantized_cache(model))``; a pipeline takes it the same
    way (``pipe(prompt, cache=hfquant.quantized_cache(pipe.model))``). A cache holds one
    generation's keys and values: make a new one for each call. An encoder-decoder model gets
    an EncoderDecoderCache (quantized self-attention, float cross-attention). A model the cache
    cannot serve gets None (generate then uses its default cache) and a warning."""
    settings = kv_cache_settings(model)
    if settings is None:
        return None
    try:
        return build_quantized_cache(model.config, settings)
    except ValueError as e:
        warn_unserved(model.config, settings[0], str(e))
        return None


def build_quantized_cache(config, settings) -> Cache:
    """The QuantizedKVCache (an EncoderDecoderCache around it for an encoder-decoder model) of
    kv_cache_settings' ``settings``; raises ValueError for a model it cannot serve."""
    if getattr(config, "is_encoder_decoder", False):
        return QuantizedKVCache.for_encoder_decoder(config, *settings)
    return QuantizedKVCache(config, *settings)
