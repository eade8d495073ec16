"""QuantLinear: weight-only INT4/INT8 linear layer backed by torch.ops.hfquant.qlinear."""
from __future__ import annotations

import threading

import torch
from torch import nn

from .. import formats, ops
from ..formats.v1 import num_groups
from ..ref import qweight_from_packed


# Packing happens once per layer; one lock for all layers keeps modules copyable
# (deepcopy, pickle-free state) and makes concurrent first calls pack exactly once.
_PACK_LOCK = threading.Lock()


class QuantLinear(nn.Module):
    """A Linear layer whose weight is stored as format v1 tensors (qweight, scales, zeros).

    The checkpoint tensors are buffers named like the checkpoint keys. On first use (or on
    ``pack()``) they are repacked once into the CPU kernel layout; the big ``qweight`` is
    then released and rebuilt from the packed copy only when a state dict is asked for, so
    the layer holds one copy of its codes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 symmetric: bool, dtype: torch.dtype = torch.float32, device=None,
                 float_weight_shape: tuple[int, int] | None = None, float_weight_transposed: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.float_weight_transposed = float_weight_transposed
        G = num_groups(in_features, group_size)
        qcols = (in_features + 1) // 2 if bits == 4 else in_features
        qdtype = torch.int8 if (bits == 8 and symmetric) else torch.uint8
        self.register_buffer("qweight", torch.empty(out_features, qcols, dtype=qdtype, device=device))
        self.register_buffer("scales", torch.empty(out_features, G, dtype=dtype, device=device))
        if symmetric:
            self.zeros = None
        else:
            self.register_buffer("zeros", torch.empty(out_features, G, dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        if float_weight_shape is not None:
            # Quantize-on-load: the float checkpoint weight lands here and is replaced by
            # qweight/scales/zeros by the conversion op; it never holds real data.
            self.weight = nn.Parameter(torch.empty(float_weight_shape, dtype=dtype, device=device),
                                       requires_grad=False)
        self._packed = False
        self._register_state_dict_hook(QuantLinear._restore_qweight_hook)

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_float(cls, linear: nn.Module, bits: int, group_size: int, symmetric: bool,
                   transposed: bool = False) -> "QuantLinear":
        """Quantizes an nn.Linear (or a Conv1D-style [in, out] weight with transposed=True)."""
        w = linear.weight.detach()
        if transposed:
            w = w.t()
        out_features, in_features = w.shape
        q = formats.quantize_rtn(w, bits, group_size, symmetric)
        mod = cls(in_features, out_features, linear.bias is not None, bits, group_size, symmetric,
                  dtype=w.dtype, device=w.device)
        mod.load_quantized(q.qweight, q.scales, q.zeros)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def load_quantized(self, qweight, scales, zeros) -> None:
        self.qweight = qweight
        self.scales = scales
        if zeros is not None:
            self.zeros = zeros
        self._packed = False

    def validate(self, name: str = "") -> None:
        formats.validate(name or type(self).__name__, self._canonical_qweight(), self.scales, self.zeros,
                         self.bits, self.group_size, self.in_features, self.out_features, self.symmetric)

    # -- kernel layout ----------------------------------------------------------------
    def pack(self) -> None:
        """Repacks into the kernel layout (once) and releases the canonical qweight."""
        with _PACK_LOCK:
            if self._packed:
                return
            qweight = self.qweight
            if qweight.device.type == "meta":
                raise RuntimeError("hfquant: QuantLinear has no weights yet (still on the meta device)")
            pw, ps = ops.repack(qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features)
            self.register_buffer("packed_weight", pw, persistent=False)
            self.register_buffer("packed_scales", ps, persistent=False)
            del self._buffers["qweight"]
            self._packed = True

    def _canonical_qweight(self) -> torch.Tensor:
        if not self._packed:
            return self.qweight
        return qweight_from_packed(self.packed_weight, self.bits, self.out_features, self.in_features,
                                   self.symmetric)

    @staticmethod
    def _restore_qweight_hook(module, state_dict, prefix, local_metadata):
        if module._packed:
            state_dict[prefix + "qweight"] = module._canonical_qweight()
        # one key order whether packed or not: qweight, scales, zeros, bias
        for key in ("qweight", "scales", "zeros", "bias"):
            if prefix + key in state_dict:
                state_dict[prefix + key] = state_dict.pop(prefix + key)
        return state_dict

    def _apply(self, fn, recurse=True):
        # A cast or move changes the canonical tensors; the kernel layout is derived from them.
        if self._packed:
            qweight = self._canonical_qweight()
            del self._buffers["packed_weight"], self._buffers["packed_scales"]
            self.register_buffer("qweight", qweight)
            self._packed = False
        return super()._apply(fn, recurse)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name != "weight":
                raise
        # Code written for nn.Linear reads `.weight` (its dtype, shape, or a weight init that
        # skips initialised tensors): hand it a read-only dequantized copy, marked initialised.
        w = self.dequantize_weight()
        w._is_hf_initialized = True
        return w

    # -- compute ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._packed:
            self.pack()
        return ops.qlinear(x, self.packed_weight, self.packed_scales, self.bias, self.bits, self.group_size,
                           self.out_features, self.in_features)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [out, in] this layer computes with."""
        return formats.dequantize(self._canonical_qweight(), self.scales, self.zeros, self.bits, self.group_size,
                                  self.in_features, dtype or self.scales.dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        dtype = dtype or self.scales.dtype
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
                        device=self.scales.device)
        with torch.no_grad():
            lin.weight.copy_(self.dequantize_weight(dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias.to(dtype))
        return lin

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, {g}, {'symmetric' if self.symmetric else 'asymmetric'}")
