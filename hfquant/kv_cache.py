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
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache

try:
    from transformers.cache_utils import BaseQuantizedLayer
except ImportError:  # older transformers: hfquant imports, only this cache is unavailable

    class BaseQuantizedLayer:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            raise ImportError("hfquant.QuantizedKVCache needs a transformers release with "
                              "cache_utils.BaseQuantizedLayer (5.24 has it)")

from . import ops

SUPPORTED_BITS = (2, 4, 8)


def check_kv_cache_args(bits, group_size, residual_length) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"QuantizedKVCache: bits={bits!r} is not supported (use one of {SUPPORTED_BITS})")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"QuantizedKVCache: group_size={group_size!r} must be a positive integer")
    if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
        raise ValueError(f"QuantizedKVCache: residual_length={residual_length!r} must be an integer >= 0")


class QuantizedKVLayer(BaseQuantizedLayer):
    """One attention layer's cache: packed key/value stores plus a full-precision window."""

    def __init__(self, bits: int = 4, group_size: int = 64, residual_length: int = 128):
        super().__init__()
        check_kv_cache_args(bits, group_size, residual_length)
        self.bits = bits
        self.group_size = group_size
        self.residual_length = residual_length
        self._qlen = 0  # tokens in the quantized stores
        self._stores: dict[str, list[torch.Tensor]] = {}  # "k"/"v" -> [codes, scales, mins]

    # BaseQuantizedLayer's hooks: this layer quantizes into its stores in update() instead.
    def _quantize(self, tensor):
        raise NotImplementedError("QuantizedKVLayer quantizes into its stores in update()")

    def _dequantize(self, q_tensor):
        raise NotImplementedError("QuantizedKVLayer dequantizes its stores in update()")

    # -- storage ----------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        D = key_states.shape[-1]
        if D % self.group_size or value_states.shape[-1] % self.group_size:
            raise ValueError(f"QuantizedKVCache: group_size={self.group_size} does not divide head_dim={D}")
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self._qlen = 0
        self._stores = {}
        self.is_initialized = True

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
        for key, like, per_channel in (("k", like_k, True), ("v", like_v, False)):
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
        out = torch.empty(*like.shape[:-2], total, like.shape[-1], dtype=self.dtype, device=self.device)
        if self._qlen:
            c, s, m = self._stores[key]
            ops.kv_dequantize_into(c, s, m, out, self._qlen, self.bits, self.group_size, per_channel)
        return out

    # -- the cache protocol -------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        self.cumulative_length += t
        q, r = self._qlen, self.keys.shape[-2]
        total = q + r + t
        keys = self._dequantized("k", total, True)
        values = self._dequantized("v", total, False)
        keys[..., q:q + r, :] = self.keys
        keys[..., q + r:, :] = key_states
        values[..., q:q + r, :] = self.values
        values[..., q + r:, :] = value_states
        # Flush whole groups of the oldest full-precision tokens, keeping >= residual_length.
        g = self.group_size
        flush = max(0, (r + t - self.residual_length) // g * g)
        if flush:
            self._grow(keys, values, q + flush)
            for key, src, per_channel in (("k", keys, True), ("v", values, False)):
                c, s, m = self._stores[key]
                ops.kv_append(src[..., q:q + flush, :], c, s, m, q, self.bits, g, per_channel)
            self._qlen = q + flush
        # the window is copied out so that the returned buffers are not kept alive
        self.keys = keys[..., q + flush:, :].clone()
        self.values = values[..., q + flush:, :].clone()
        return keys, values

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
        for key, per_channel in (("k", True), ("v", False)):
            if key not in self._stores:
                continue
            c, s, m = self._stores[key]
            if allocated:
                total += c.nbytes + s.nbytes + m.nbytes
            else:
                rows = self._param_rows(self._qlen, per_channel)
                total += c[..., :self._qlen, :].nbytes + 2 * s[..., :rows, :].nbytes
        return total


def cache_geometry(config) -> tuple[int, int]:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * (layers or 0)
    other = sorted(set(layer_types) - {"full_attention"})
    model_type = getattr(text, "model_type", type(config).__name__)
    if not layers or not head_dim or other:
        why = f"layer types {other}" if other else "no num_hidden_layers / head_dim in its config"
        raise ValueError(f"QuantizedKVCache: a {model_type} model cannot use it ({why}); it serves decoders whose "
                         "layers are all full attention")
    return layers, head_dim


class QuantizedKVCache(Cache):
    """A transformers Cache whose layers store keys and values quantized to ``bits`` (8, 4, 2).

    Args:
        config: the model's config (number of layers, head_dim, attention layer types).
        bits: 8, 4 or 2.
        group_size: channels per value group and tokens per key group (must divide head_dim).
        residual_length: newest tokens kept in full precision (flushed in whole groups).
    """

    def __init__(self, config, bits: int = 4, group_size: int = 64, residual_length: int = 128):
        check_kv_cache_args(bits, group_size, residual_length)
        layers, head_dim = cache_geometry(config)
        if head_dim % group_size:
            raise ValueError(f"QuantizedKVCache: group_size={group_size} does not divide head_dim={head_dim}")
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        super().__init__(layers=[QuantizedKVLayer(bits, group_size, residual_length) for _ in range(layers)])

    def memory_bytes(self, allocated: bool = False) -> int:
        """Bytes held by the cache (see QuantizedKVLayer.memory_bytes)."""
        return sum(layer.memory_bytes(allocated) for layer in self.layers)


def kv_cache_settings(model) -> tuple[int, int, int] | None:
    """(bits, group_size, residual_length) of the KV cache that the model's hfquant
    quantization_config asks for (kv_cache_bits, ...), or None."""
    q = getattr(getattr(model, "config", None), "quantization_config", None)
    if q is None:
        return None
    get = q.get if isinstance(q, dict) else (lambda key, default=None: getattr(q, key, default))
    if get("quant_method") != "hfquant" or get("kv_cache_bits") is None:
        return None
    return get("kv_cache_bits"), get("kv_cache_group_size", 64), get("kv_cache_residual_length", 128)


def quantized_cache(model) -> QuantizedKVCache | None:
    """A fresh QuantizedKVCache with the settings the model's quantization_config holds
    (HfQuantConfig(kv_cache_bits=...)), for one generate call, or None when it holds none:
    ``model.generate(ids, cache=hfquant.quantized_cache(model))``; a pipeline takes it the same
    way (``pipe(prompt, cache=hfquant.quantized_cache(pipe.model))``). A cache holds one
    generation's keys and values: make a new one for each call."""
    settings = kv_cache_settings(model)
    return None if settings is None else QuantizedKVCache(model.config, *settings)
