"""LutLinear: a linear layer whose weight is clustered (method "kmeans"), backed by
torch.ops.hfquant.lut_linear: 2^bits centroids per output row (or per row and group),
each weight stored as the index of its centroid."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..formats.kernel_layouts import lut_qweight_from_packed
from ..formats.lut import dequantize_lut, pack_indices, packed_columns, validate_lut
from ..formats.v1 import num_groups
from .base import PackedLinear


class LutLinear(PackedLinear):
    """Checkpoint tensors ``qweight`` (uint8 bit-stream indices), ``codebook`` [out, G, 2^bits]
    in the model's dtype and ``bias``; the kernel layout (packed_indices, packed_codebook)
    comes from ``hfquant::lut_repack``."""

    _state_order = ("qweight", "codebook", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int = -1,
                 dtype: torch.dtype = torch.float32, device=None, float_weight_shape: tuple[int, int] | None = None,
                 float_weight_transposed: bool = False, kmeans_init: str = "uniform", kmeans_max_iter: int = 100,
                 kmeans_seed: int = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.float_weight_transposed = float_weight_transposed
        # how quantize-on-load clusters (not needed once the tensors are there)
        self.kmeans_init = kmeans_init
        self.kmeans_max_iter = kmeans_max_iter
        self.kmeans_seed = kmeans_seed
        G = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.empty(out_features, packed_columns(in_features, bits), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("codebook", torch.empty(out_features, G, 1 << bits, dtype=dtype, device=device))
        self._init_bias_and_placeholder(bias, dtype, device, float_weight_shape)

    # -- construction ---------------------------------------------------------------
    def quantize_float(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Clusters a float weight [out, in] with this layer's settings: {"qweight", "codebook"}
        (codebook in this layer's dtype). ``importance`` (same shape, >= 0) weights the fit."""
        from ..algorithms.clustering import kmeans_quantize

        r = kmeans_quantize(weight, self.bits, self.group_size, importance=importance, init=self.kmeans_init,
                            max_iter=self.kmeans_max_iter, seed=self.kmeans_seed,
                            codebook_dtype=self.codebook.dtype)
        return {"qweight": pack_indices(r.indices, self.bits), "codebook": r.codebook}

    @classmethod
    def from_float(cls, linear: nn.Module, bits: int, group_size: int = -1, transposed: bool = False,
                   importance: torch.Tensor | None = None, **kmeans) -> "LutLinear":
        """Clusters an nn.Linear (or a Conv1D-style [in, out] weight with transposed=True).

        ``kmeans``: kmeans_init, kmeans_max_iter, kmeans_seed."""
        w = linear.weight.detach()
        if transposed:
            w = w.t()
        out_features, in_features = w.shape
        mod = cls(in_features, out_features, linear.bias is not None, bits, group_size, dtype=w.dtype,
                  device=w.device, **kmeans)
        t = mod.quantize_float(w, importance)
        mod.load_quantized(t["qweight"], t["codebook"])
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def load_quantized(self, qweight: torch.Tensor, codebook: torch.Tensor) -> None:
        self.qweight = qweight
        self.codebook = codebook
        self._packed = False

    def validate(self, name: str = "") -> None:
        validate_lut(name or type(self).__name__, self._canonical_qweight(), self.codebook, self.bits,
                     self.group_size, self.in_features, self.out_features)

    # -- kernel layout ----------------------------------------------------------------
    def _kernel_tensors(self) -> dict[str, torch.Tensor]:
        idx, tab = ops.lut_repack(self.qweight, self.codebook, self.bits, self.group_size, self.in_features)
        return {"packed_indices": idx, "packed_codebook": tab}

    def _qweight_from_kernel(self) -> torch.Tensor:
        return lut_qweight_from_packed(self.packed_indices, self.bits, self.in_features)

    # -- compute ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._kernel()
        return ops.lut_linear(x, k["packed_indices"], k["packed_codebook"], self.bias, self.bits, self.group_size,
                              self.out_features, self.in_features)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_lut(self._canonical_qweight(), self.codebook, self.bits, self.group_size,
                              self.in_features, dtype or self.codebook.dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        dtype = dtype or self.codebook.dtype
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
                        device=self.codebook.device)
        with torch.no_grad():
            lin.weight.copy_(self.dequantize_weight(dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias.to(dtype))
        return lin

    def extra_repr(self) -> str:
        g = "one codebook per row" if self.group_size == -1 else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits} ({1 << self.bits} centroids), {g}")
