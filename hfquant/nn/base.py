"""PackedLinear: what the quantized linear layers share.

A layer holds its checkpoint tensors as buffers named like the checkpoint keys (qweight,
scales, ...). On first use (or ``pack()``) it derives the kernel layout once; the big
``qweight`` is then released and rebuilt exactly from the kernel copy only when a state
dict is asked for, so the layer holds one copy of its codes. A cast or move drops the
kernel layout and restores ``qweight``.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

from ..runtime import settings

# Packing happens once per layer; one lock for all layers keeps modules copyable
# (deepcopy, pickle-free state) and makes concurrent first calls pack exactly once.
_PACK_LOCK = threading.Lock()


def int8_activations(x: torch.Tensor, rows: int, kernel_bits: int) -> bool:
    """Whether a call of a 4-bit layer (QuantLinear, QuantExperts) with input ``x`` of ``rows``
    rows (tokens) runs with int8 activations: hfquant.settings.int8_activations_min_m set and
    reached, 4-bit kernels, the CPU, and no gradient wanted."""
    min_m = settings.int8_activations_min_m
    return (min_m is not None and kernel_bits == 4 and x.device.type == "cpu" and rows >= min_m
            and not (torch.is_grad_enabled() and x.requires_grad))


def offloaded(module: nn.Module) -> bool:
    """Whether accelerate offloads a module's tensors (device_map with "disk", or "cpu" beside
    an accelerator, and offload_buffers=True): its hook loads them before each call and drops
    them after, so the kernel layout is derived per call and never kept."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    return any(getattr(h, "offload", False) and getattr(h, "offload_buffers", False) for h in hooks)


class PackedLinear(nn.Module):
    """Base of QuantLinear and Int8Linear; subclasses define the kernel layout."""

    in_features: int
    out_features: int
    # checkpoint tensors in state-dict order (after qweight), then bias
    _state_order: tuple[str, ...] = ("qweight", "scales", "bias")

    def __init__(self):
        super().__init__()
        self._packed = False
        self._kernel_names: tuple[str, ...] = ()
        self._register_state_dict_hook(PackedLinear._restore_qweight_hook)

    def _init_bias_and_placeholder(self, bias: bool, dtype, device, float_weight_shape) -> None:
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        if float_weight_shape is not None:
            # Quantize-on-load: the float checkpoint weight lands here and is replaced by
            # the quantized tensors by the conversion op; it never holds real data.
            # (set directly: register_parameter's hasattr check would reach __getattr__'s
            # dequantized `weight`)
            self._parameters["weight"] = nn.Parameter(torch.empty(float_weight_shape, dtype=dtype, device=device),
                                                      requires_grad=False)

    # -- to be defined by subclasses ---------------------------------------------------
    def _kernel_tensors(self) -> dict[str, torch.Tensor]:
        """The kernel layout, derived from the checkpoint tensors."""
        raise NotImplementedError

    def _qweight_from_kernel(self) -> torch.Tensor:
        """The canonical qweight, rebuilt exactly from the kernel layout."""
        raise NotImplementedError

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [out, in] this layer computes with."""
        raise NotImplementedError

    # -- kernel layout ----------------------------------------------------------------
    def pack(self) -> None:
        """Derives the kernel layout (once) and releases the canonical qweight."""
        with _PACK_LOCK:
            if self._packed:
                return
            if self.qweight.device.type == "meta":
                raise RuntimeError(f"hfquant: {type(self).__name__} has no weights yet (still on the meta device)")
            tensors = self._kernel_tensors()
            for name, t in tensors.items():
                self.register_buffer(name, t, persistent=False)
            self._kernel_names = tuple(tensors)
            del self._buffers["qweight"]
            self._packed = True

    def _offloaded(self) -> bool:
        return offloaded(self)

    def _kernel(self) -> dict[str, torch.Tensor]:
        """The kernel layout for this call: the packed buffers (packing once on first use),
        or, for an offloaded layer, derived from the tensors its hook just loaded."""
        if not self._packed:
            if self._offloaded():
                self.validate()
                return self._kernel_tensors()
            self.pack()
        return {name: getattr(self, name) for name in self._kernel_names}

    def _canonical_qweight(self) -> torch.Tensor:
        return self._qweight_from_kernel() if self._packed else self.qweight

    @staticmethod
    def _restore_qweight_hook(module, state_dict, prefix, local_metadata):
        if module._packed:
            state_dict[prefix + "qweight"] = module._canonical_qweight()
        # one key order whether packed or not
        for key in module._state_order:
            if prefix + key in state_dict:
                state_dict[prefix + key] = state_dict.pop(prefix + key)
        return state_dict

    def _apply(self, fn, recurse=True):
        # A cast or move changes the canonical tensors; the kernel layout is derived from them.
        if self._packed:
            qweight = self._canonical_qweight()
            for name in self._kernel_names:
                del self._buffers[name]
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

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        dtype = dtype or self.scales.dtype
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
                        device=self.scales.device)
        with torch.no_grad():
            lin.weight.copy_(self.dequantize_weight(dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias.to(dtype))
        return lin
