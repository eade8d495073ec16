"""HfQuantConfig: the quantization_config of hfquant for transformers."""
from __future__ import annotations

import copy
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

FORMAT_VERSION = 1
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128, 256)
SUPPORTED_METHODS = ("rtn",)
DEFAULT_SKIP = ["lm_head"]


class HfQuantConfig(QuantizationConfigMixin):
    """Weight-only quantization settings, validated on construction.

    Args:
        bits: 4 or 8.
        group_size: -1 (one scale per output channel) or 32, 64, 128, 256. The last group
            of a row may be shorter when it does not divide the layer's in_features.
        symmetric: symmetric codes (no zero point) or asymmetric with a per-group zero point.
        method: "rtn" (round to nearest, quantized while the weights load).
        modules_to_not_convert: module names (or name suffixes) kept in full precision;
            defaults to ["lm_head"].
        modules_override: per-module settings, ``{"model.layers.0.mlp.down_proj": {"bits": 8}}``;
            keys are module names (exact, or a suffix after a dot).
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = True,
        method: str = "rtn",
        modules_to_not_convert: list[str] | None = None,
        modules_override: dict[str, dict[str, Any]] | None = None,
        format_version: int = FORMAT_VERSION,
        **kwargs,
    ):
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(f"HfQuantConfig: unknown argument(s) {sorted(kwargs)}")
        self.quant_method = "hfquant"
        self.format_version = format_version
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.method = method
        self.modules_to_not_convert = list(DEFAULT_SKIP if modules_to_not_convert is None else modules_to_not_convert)
        self.modules_override = copy.deepcopy(modules_override) if modules_override else {}
        self.post_init()

    def post_init(self):
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"HfQuantConfig: format_version={self.format_version!r} is not supported by this hfquant "
                f"(it reads format_version {FORMAT_VERSION}); upgrade hfquant to load this checkpoint"
            )
        if self.method not in SUPPORTED_METHODS:
            raise ValueError(f"HfQuantConfig: method={self.method!r} is not supported (use one of {SUPPORTED_METHODS})")
        _check_scheme("HfQuantConfig", self.bits, self.group_size, self.symmetric)
        if not isinstance(self.modules_to_not_convert, list) or not all(
            isinstance(m, str) for m in self.modules_to_not_convert
        ):
            raise ValueError("HfQuantConfig: modules_to_not_convert must be a list of module names")
        if not isinstance(self.modules_override, dict):
            raise ValueError("HfQuantConfig: modules_override must be a dict {module name: {setting: value}}")
        for name, over in self.modules_override.items():
            if not isinstance(over, dict) or set(over) - {"bits", "group_size", "symmetric"}:
                raise ValueError(
                    f"HfQuantConfig: modules_override[{name!r}] must be a dict with keys among "
                    f"bits, group_size, symmetric; got {over!r}"
                )
            s = self.scheme_for(name)
            _check_scheme(f"HfQuantConfig: modules_override[{name!r}]", s["bits"], s["group_size"], s["symmetric"])

    def scheme_for(self, module_name: str) -> dict[str, Any]:
        """The bits / group_size / symmetric that apply to one module."""
        scheme = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        for key, over in self.modules_override.items():
            if _name_matches(module_name, key):
                scheme.update(over)
        return scheme

    def is_skipped(self, module_name: str) -> bool:
        return any(_name_matches(module_name, key) for key in self.modules_to_not_convert)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": "hfquant",
            "format_version": self.format_version,
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "modules_override": copy.deepcopy(self.modules_override),
        }

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @property
    def short_name(self) -> str:
        g = "c" if self.group_size == -1 else f"g{self.group_size}"
        return f"w{self.bits}{g}{'' if self.symmetric else 'a'}"


def _name_matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _check_scheme(where: str, bits, group_size, symmetric) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{where}: bits={bits!r} is not supported (use one of {SUPPORTED_BITS})")
    if isinstance(group_size, bool) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{where}: group_size={group_size!r} is not supported (use one of {SUPPORTED_GROUP_SIZES})")
    if not isinstance(symmetric, bool):
        raise ValueError(f"{where}: symmetric must be True or False, got {symmetric!r}")
