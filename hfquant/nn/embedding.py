"""QuantEmbedding: a token embedding stored as format v1 rows; TiedQuantLinear: an output
projection (lm_head) that shares those rows, as a tied float lm_head shares the embedding.

The embedding table [num_embeddings, embedding_dim] is quantized exactly like a linear
weight [out_features = num_embeddings, in_features = embedding_dim]: row-wise groups along
the embedding dimension, the same checkpoint tensors (qweight, scales, zeros) and the same
kernel layout. The lookup (``hfquant::qembedding``) decodes the requested rows from that
layout; the tied lm_head runs ``hfquant::qlinear`` (the W4/W8 GEMV) on the same packed
tensors, so the model holds one quantized copy of the table.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import formats, ops
from .quant_linear import QuantLinear


class QuantEmbedding(QuantLinear):
    """nn.Embedding with a quantized table (2/3/4/8 bits, per row or row groups)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int, symmetric: bool,
                 dtype: torch.dtype = torch.float32, device=None, float_weight_shape: tuple[int, int] | None = None,
                 padding_idx: int | None = None, float_weight_transposed: bool = False, act_order: bool = False):
        if act_order:
            raise ValueError("hfquant: QuantEmbedding has no column permutation (act_order)")
        super().__init__(embedding_dim, num_embeddings, False, bits, group_size, symmetric, dtype=dtype,
                         device=device, float_weight_shape=float_weight_shape)
        self.padding_idx = padding_idx

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, group_size: int, symmetric: bool) -> "QuantEmbedding":
        check_embedding(emb)
        w = emb.weight.detach()
        q = formats.quantize_rtn(w, bits, group_size, symmetric)
        mod = cls(emb.num_embeddings, emb.embedding_dim, bits, group_size, symmetric, dtype=w.dtype, device=w.device,
                  padding_idx=emb.padding_idx)
        mod.load_quantized(q.qweight, q.scales, q.zeros)
        return mod

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        k = self._kernel()
        return ops.qembedding(ids, k["packed_weight"], k["packed_scales"], self.kernel_bits, self.group_size,
                              self.out_features, self.in_features, self.scales.dtype)

    def to_embedding(self, dtype: torch.dtype | None = None) -> nn.Embedding:
        dtype = dtype or self.scales.dtype
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, dtype=dtype,
                           device=self.scales.device)
        with torch.no_grad():
            emb.weight.copy_(self.dequantize_weight(dtype))
        return emb

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Module:  # dequantize(): back to nn.Embedding
        return self.to_embedding(dtype)

    def extra_repr(self) -> str:
        g = "per-row" if self.group_size == -1 else f"group_size={self.group_size}"
        return (f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, {g}, "
                f"{'symmetric' if self.symmetric else 'asymmetric'}")


class TiedQuantLinear(nn.Module):
    """y = x @ E^T for the quantized embedding table E of ``source`` (a tied lm_head).

    Holds no tensors of its own (nothing in the state dict); ``source`` is kept outside the
    module tree, so the table is saved, moved and cast once, with the embedding."""

    def __init__(self, source: QuantEmbedding, source_name: str = ""):
        super().__init__()
        self._source = (source,)
        self.source_name = source_name
        self.in_features = source.embedding_dim
        self.out_features = source.num_embeddings
        self.register_parameter("bias", None)

    @property
    def source(self) -> QuantEmbedding:
        return self._source[0]

    @property
    def weight(self) -> torch.Tensor:
        # code written for nn.Linear reads `.weight` (dtype, shape): a read-only dequantized copy
        w = self.source.dequantize_weight()
        w._is_hf_initialized = True
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self.source
        k = src._kernel()
        return ops.qlinear(x, k["packed_weight"], k["packed_scales"], None, src.kernel_bits, src.group_size,
                           self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tied to "
                f"{self.source_name or 'the quantized embedding'} (bits={self.source.bits})")


def check_embedding(emb: nn.Module) -> None:
    """Raises unless ``emb`` is an nn.Embedding whose forward is a plain row lookup."""
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"hfquant: {type(emb).__name__} is not an nn.Embedding")
    if emb.max_norm is not None or emb.sparse or emb.scale_grad_by_freq:
        raise ValueError("hfquant: embeddings with max_norm, sparse or scale_grad_by_freq cannot be quantized")
    if type(emb).forward is not nn.Embedding.forward:  # e.g. Gemma's, which scales the rows it looks up
        raise ValueError(f"hfquant: {type(emb).__name__} computes more than a row lookup (its own forward), which a "
                         "quantized embedding would drop")
