"""QuantLinear: weight-only INT4/INT8 linear layer backed by torch.ops.hfquant.qlinear."""
from __future__ import annotations

import torch
from torch import nn

from .. import formats, ops
from ..formats.kernel_layouts import codes_from_packed, qweight_from_packed
from ..formats.v1 import STREAM_BITS, num_groups, pack_bits, pack_int4, packed_columns, symmetric_zero, unpack_bits
from .base import PackedLinear, int8_activations


class QuantLinear(PackedLinear):
    """A Linear layer whose weight is stored as format v1 tensors (qweight, scales, zeros).

    The kernel layout (packed_weight, packed_scales) comes from ``hfquant::repack``. 2- and
    3-bit layers (bit-stream codes on disk) run on the 4-bit kernel: their codes and zero
    points fit a nibble, so at load they are repacked as asymmetric 4-bit codes with the same
    scales, and compute exactly what the 2/3-bit tensors stand for (in memory they take the
    4-bit kernel's space).
    With ``act_order`` (GPTQ's act-order), the stored columns are the input columns in the
    order ``perm`` (int32 [in_features]): stored column j holds input column perm[j], and
    the layer reads its input as x[..., perm].
    ``zero_point="float"`` (asymmetric) stores float ``offsets`` instead of integer zeros
    (weight = code * scale + offset); ``grid`` (symmetric) is how the scales were chosen,
    "extreme" and "best" storing negative scales (formats.v1.group_params).
    """

    _state_order = ("qweight", "scales", "zeros", "offsets", "perm", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 symmetric: bool, dtype: torch.dtype = torch.float32, device=None,
                 float_weight_shape: tuple[int, int] | None = None, float_weight_transposed: bool = False,
                 act_order: bool = False, grid: str = "range", zero_point: str = "integer"):
        super().__init__()
        if grid not in formats.GRIDS or zero_point not in formats.ZERO_POINTS:
            raise ValueError(f"hfquant: QuantLinear: grid={grid!r} / zero_point={zero_point!r} is not supported "
                             f"(grid one of {formats.GRIDS}, zero_point one of {formats.ZERO_POINTS})")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.grid = grid if symmetric else "range"
        self.zero_point = "integer" if symmetric else zero_point
        self.float_weight_transposed = float_weight_transposed
        G = num_groups(in_features, group_size)
        qcols = packed_columns(in_features, bits) if bits in STREAM_BITS else in_features
        qdtype = torch.int8 if (bits == 8 and symmetric) else torch.uint8
        self.register_buffer("qweight", torch.empty(out_features, qcols, dtype=qdtype, device=device))
        self.register_buffer("scales", torch.empty(out_features, G, dtype=dtype, device=device))
        if self.zero_point == "float":
            self.zeros = None
            self.register_buffer("offsets", torch.empty(out_features, G, dtype=dtype, device=device))
        elif not symmetric:
            self.offsets = None
            self.register_buffer("zeros", torch.empty(out_features, G, dtype=torch.uint8, device=device))
        else:
            self.zeros = self.offsets = None
        if act_order:
            self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device))
        else:
            self.perm = None
        self._init_bias_and_placeholder(bias, dtype, device, float_weight_shape)

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_float(cls, linear: nn.Module, bits: int, group_size: int, symmetric: bool,
                   transposed: bool = False, act_order: bool = False, grid: str = "range",
                   zero_point: str = "integer") -> "QuantLinear":
        """Quantizes an nn.Linear (or a Conv1D-style [in, out] weight with transposed=True)."""
        w = linear.weight.detach()
        if transposed:
            w = w.t()
        out_features, in_features = w.shape
        q = formats.quantize_rtn(w, bits, group_size, symmetric, grid=grid, zero_point=zero_point)
        mod = cls(in_features, out_features, linear.bias is not None, bits, group_size, symmetric,
                  dtype=w.dtype, device=w.device, act_order=act_order, grid=grid, zero_point=zero_point)
        mod.load_quantized(q.qweight, q.scales, q.zeros, q.offsets)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    @classmethod
    def from_quantized(cls, q: "formats.QuantizedWeight", bias: torch.Tensor | None, perm: torch.Tensor | None = None,
                       act_order: bool = False, grid: str = "range") -> "QuantLinear":
        """A layer holding already-quantized tensors (GPTQ's result, say). ``act_order``
        gives the layer a ``perm`` (identity when ``perm`` is None)."""
        out_features = q.qweight.shape[0]
        symmetric = q.zeros is None and q.offsets is None
        mod = cls(q.in_features, out_features, bias is not None, q.bits, q.group_size, symmetric,
                  dtype=q.scales.dtype, device=q.qweight.device, act_order=act_order or perm is not None,
                  grid=grid, zero_point="float" if q.offsets is not None else "integer")
        mod.load_quantized(q.qweight, q.scales, q.zeros, q.offsets)
        if perm is not None:
            mod.perm = perm.to(torch.int32).contiguous()
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    def load_quantized(self, qweight, scales, zeros=None, offsets=None) -> None:
        self.qweight = qweight
        self.scales = scales
        if zeros is not None:
            self.zeros = zeros
        if offsets is not None:
            self.offsets = offsets
        self._packed = False

    def validate(self, name: str = "") -> None:
        name = name or type(self).__name__
        formats.validate(name, self._canonical_qweight(), self.scales, self.zeros,
                         self.bits, self.group_size, self.in_features, self.out_features, self.symmetric,
                         offsets=self.offsets, signed_scales=self.grid != "range")
        if self.perm is not None:
            p = self.perm
            if p.dtype != torch.int32 or tuple(p.shape) != (self.in_features,):
                raise ValueError(f"hfquant: {name}.perm has shape {tuple(p.shape)} and dtype {p.dtype}; expected "
                                 f"({self.in_features},) torch.int32")
            if not torch.equal(torch.sort(p.long()).values, torch.arange(self.in_features, device=p.device)):
                raise ValueError(f"hfquant: {name}.perm is not a permutation of 0..{self.in_features - 1}")

    # -- kernel layout ----------------------------------------------------------------
    @property
    def kernel_bits(self) -> int:
        """The bits of the kernel layout: 4 for 2/3/4-bit layers, 8 for 8-bit."""
        return 8 if self.bits == 8 else 4

    def _kernel_tensors(self) -> dict[str, torch.Tensor]:
        qweight, zeros = self.qweight, self.zeros
        if self.bits < 4:
            # 2/3-bit codes as asymmetric 4-bit codes (the same values, one per nibble)
            qweight = pack_int4(unpack_bits(qweight, self.bits, self.in_features).to(torch.uint8))
            if zeros is None and self.offsets is None:
                zeros = torch.full(self.scales.shape, symmetric_zero(self.bits), dtype=torch.uint8,
                                   device=qweight.device)
        pw, ps = ops.repack(qweight, self.scales, zeros, self.kernel_bits, self.group_size, self.in_features,
                            self.offsets)
        return {"packed_weight": pw, "packed_scales": ps}

    def _qweight_from_kernel(self) -> torch.Tensor:
        if self.bits < 4:
            codes = codes_from_packed(self.packed_weight, 4)[:self.out_features, :self.in_features]
            return pack_bits(codes, self.bits)
        return qweight_from_packed(self.packed_weight, self.bits, self.out_features, self.in_features,
                                   self.symmetric)

    # -- compute ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._kernel()
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if x.dim() > 0 and int8_activations(x, x.numel() // max(1, x.shape[-1]), self.kernel_bits):
            return ops.qlinear_a8(x, k["packed_weight"], k["packed_scales"], self.bias, 4, self.group_size,
                                  self.out_features, self.in_features)
        return ops.qlinear(x, k["packed_weight"], k["packed_scales"], self.bias, self.kernel_bits, self.group_size,
                           self.out_features, self.in_features)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = formats.dequantize(self._canonical_qweight(), self.scales, self.zeros, self.bits, self.group_size,
                               self.in_features, dtype or self.scales.dtype, offsets=self.offsets)
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm.long())]
        return w

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, {g}, "
                f"{'symmetric' if self.symmetric else 'asymmetric'}"
                f"{'' if self.grid == 'range' else ', grid=' + self.grid}"
                f"{', float offsets' if self.zero_point == 'float' else ''}"
                f"{', act_order' if self.perm is not None else ''}")
