"""Weight clustering ("kmeans"): 2^bits centroids per output row (or per row and group), each
weight stored as the index of its centroid; the layers run a lookup-table kernel. Data-free,
quantized while the weights load."""
from __future__ import annotations

import dataclasses

from torch import nn

from ..nn import LutLinear
from .base import Method, check_scheme_types, SUPPORTED_GROUP_SIZES, register_method

KMEANS_INITS = ("uniform", "quantile", "kmeans++")


@dataclasses.dataclass
class KmeansSettings:
    kmeans_init: str = "uniform"
    kmeans_max_iter: int = 100
    kmeans_seed: int = 0


@register_method
class Kmeans(Method):
    name = "kmeans"
    Settings = KmeansSettings
    SETTING_TYPES = {"kmeans_init": "str", "kmeans_max_iter": "int", "kmeans_seed": "int"}
    layer_class = LutLinear
    bits_supported = (2, 3, 4)
    default_group_size = -1
    trainable = False
    why_not_trainable = "its codes index a learned codebook"
    why_not_qat = "its codes index a learned codebook"
    why_not_exportable = "codebooks: a lookup table of centroids per row"
    tensor_keys = ("qweight", "codebook")

    def check_settings(self) -> None:
        super().check_settings()
        s = self.settings
        if s.kmeans_init not in KMEANS_INITS:
            raise ValueError(f"HfQuantConfig: kmeans_init={s.kmeans_init!r} is not supported "
                             f"(use one of {KMEANS_INITS})")
        for key, low in (("kmeans_max_iter", 1), ("kmeans_seed", 0)):
            v = getattr(s, key)
            if v < low:
                raise ValueError(f"HfQuantConfig: {key}={v!r} must be an integer >= {low}")

    def check_scheme(self, where, bits, group_size, symmetric) -> None:
        check_scheme_types(where, bits, group_size, symmetric)
        if bits not in self.bits_supported:
            raise ValueError(f"{where}: bits={bits!r} is not supported by method 'kmeans' "
                             f"(use one of {self.bits_supported})")
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"{where}: group_size={group_size!r} is not supported "
                             f"(use one of {SUPPORTED_GROUP_SIZES})")
        if symmetric is not True:
            raise ValueError(f"{where}: symmetric={symmetric!r} does not apply to method 'kmeans' (codebooks have "
                             "no zero point); leave it True")

    def _layer_settings(self) -> dict:
        return dict(vars(self.settings))

    def empty_layer(self, name, in_features, out_features, bias, **common) -> nn.Module:
        s = self.config.scheme_for(name)
        return LutLinear(in_features, out_features, bias, s["bits"], s["group_size"], **self._layer_settings(),
                         **common)

    def quantize_weight(self, name, module, weight) -> dict:
        return module.quantize_float(weight)

    def quantize_layer(self, name, module, transposed) -> nn.Module:
        s = self.config.scheme_for(name)
        return LutLinear.from_float(module, s["bits"], s["group_size"], transposed=transposed,
                                    **self._layer_settings())

    def short_name(self) -> str:
        g = "c" if self.config.group_size == -1 else f"g{self.config.group_size}"
        return f"km{self.config.bits}{g}"

    @classmethod
    def describe(cls, q: dict) -> str:
        bits, g = q.get("bits"), q.get("group_size")
        return f"{bits}-bit indices into {2 ** bits} centroids, one codebook per " + (
            "output channel" if g == -1 else f"{g} input columns")
