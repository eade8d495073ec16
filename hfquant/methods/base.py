"""The interface every quantization method implements, and the registry of methods.

A method is one class (one module of hfquant/methods/): its settings (a dataclass whose
fields are its arguments of HfQuantConfig, checked on construction), the module class its
layers become, how a layer is built empty for loading or quantized from a float layer,
an optional calibration step on the float model, what it supports (embeddings, adapters,
QAT, torch.compile, export formats) and how it is named. ``HfQuantConfig`` is the
transformers-facing shell that holds the common settings and delegates the rest; see
docs/adding_a_method.md.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar

from torch import nn

# The newest checkpoint format this hfquant writes and reads (it reads every earlier one). A
# checkpoint says the lowest version its tensors need (Method.format_version), so that
# checkpoints without version 2's grids stay readable by earlier releases. Version 3: a rotated
# model with online rotations (HfQuantConfig.rotation_online), which a reader of version 2 would
# run without them.
FORMAT_VERSION = 3
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128, 256)
DEFAULT_CALIBRATION = {"text": None, "n_samples": 32, "seq_len": 512}

_METHODS: dict[str, type["Method"]] = {}


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: makes ``HfQuantConfig(method=cls.name)`` use this class."""
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError(f"register_method: {cls.__name__} has no name")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"register_method: a method named {cls.name!r} is registered already "
                         f"({_METHODS[cls.name].__module__}.{_METHODS[cls.name].__name__})")
    if not dataclasses.is_dataclass(cls.Settings):
        raise ValueError(f"register_method: {cls.__name__}.Settings must be a dataclass")
    _METHODS[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name) -> type["Method"]:
    """The method class registered under ``name``; ValueError naming the known ones otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"HfQuantConfig: method must be a str, got {name!r} ({type(name).__name__})")
    if name not in _METHODS:
        raise ValueError(f"HfQuantConfig: method={name!r} is not supported (use one of {method_names()})")
    return _METHODS[name]


def layer_tensor_keys() -> tuple[str, ...]:
    """Every checkpoint tensor name a layer of a registered method may hold (``<module>.<key>``)."""
    return tuple(dict.fromkeys(k for m in _METHODS.values() for k in m.tensor_keys))


def methods_taking(setting: str) -> list[str]:
    """The registered methods that have a setting of this name."""
    return [n for n, m in _METHODS.items() if setting in m.setting_names()]


# ---------------------------------------------------------------- checks shared by methods

_EXPECTED = {"int": "an int", "bool": "True or False", "number": "a number", "str": "a str",
             "names": "a list of module names", "dict": "a dict", "ints": "a list of ints"}


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def type_ok(kind: str, v) -> bool:
    if kind == "int":
        return is_int(v)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "str":
        return isinstance(v, str)
    if kind == "names":
        return isinstance(v, (list, tuple)) and all(isinstance(n, str) for n in v)
    if kind == "dict":
        return isinstance(v, dict)
    if kind == "ints":
        return isinstance(v, (list, tuple)) and all(is_int(b) for b in v)
    raise ValueError(f"unknown setting kind {kind!r}")


def check_types(values: dict[str, Any], types: dict[str, str], none_ok=()) -> None:
    """ValueError naming the first setting of the wrong type, the type expected and the one given."""
    for key, kind in types.items():
        v = values.get(key)
        if v is None and key in none_ok or type_ok(kind, v):
            continue
        raise ValueError(f"HfQuantConfig: {key} must be {_EXPECTED[kind]}, got {v!r} ({type(v).__name__})")


def check_scheme_types(where: str, bits, group_size, symmetric) -> None:
    for key, v in (("bits", bits), ("group_size", group_size)):
        if not is_int(v):
            raise ValueError(f"{where}: {key} must be an int, got {v!r} ({type(v).__name__})")
    if not isinstance(symmetric, bool):
        raise ValueError(f"{where}: symmetric must be True or False, got {symmetric!r}")


def check_calibration(c) -> None:
    if not isinstance(c, dict):
        raise ValueError(f"HfQuantConfig: calibration must be a dict, got {c!r}")
    if set(c) - set(DEFAULT_CALIBRATION):
        raise ValueError(f"HfQuantConfig: calibration has unknown key(s) {sorted(set(c) - set(DEFAULT_CALIBRATION))}"
                         f" (use {sorted(DEFAULT_CALIBRATION)})")
    for key in ("n_samples", "seq_len"):
        v = c[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"HfQuantConfig: calibration[{key!r}]={v!r} must be a positive integer")
    t = c["text"]
    if t is not None and not isinstance(t, (str, os.PathLike)):
        raise ValueError(f"HfQuantConfig: calibration['text'] must be a file path or None, got {t!r}")


def check_number(name: str, v, low: float, high: float, low_open=False) -> None:
    """ValueError unless v is a finite number in [low, high] ((low, high] with low_open)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= high and (
        v > low if low_open else v >= low)
    if not ok:
        span = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise ValueError(f"HfQuantConfig: {name}={v!r} must be a number in {span}")


# ---------------------------------------------------------------- the interface


@dataclasses.dataclass
class NoSettings:
    """A method without settings of its own."""


class Method:
    """One quantization method. Subclasses set the class attributes and override the hooks
    they need; ``register_method`` makes them available by name."""

    name: ClassVar[str] = ""
    # a dataclass: its fields are the method's arguments of HfQuantConfig (defaults included),
    # SETTING_TYPES their kinds (see _EXPECTED), NONE_OK those that may be None
    Settings: ClassVar[type] = NoSettings
    SETTING_TYPES: ClassVar[dict[str, str]] = {}
    NONE_OK: ClassVar[tuple[str, ...]] = ()
    # the nn.Module class its linear layers become (hfquant.nn)
    layer_class: ClassVar[type[nn.Module]]
    bits_supported: ClassVar[tuple[int, ...]] = SUPPORTED_BITS
    default_bits: ClassVar[int] = 4
    default_group_size: ClassVar[int] = 128
    # the group size `hfquant quantize --bits 8` gives without --group-size (None: the default)
    w8_group_size: ClassVar[int | None] = None
    # whether HfQuantConfig(modules_override=...) may give layers other schemes, and whether the
    # method writes modules_override itself (its choice of scheme per layer)
    per_module_schemes: ClassVar[bool] = True
    writes_overrides: ClassVar[bool] = False
    # quantize_embeddings may be set (QuantEmbedding; ties an lm_head to it), and its default
    embeddings: ClassVar[bool] = False
    embeddings_default: ClassVar[bool] = False
    # adapters (LoRA through peft) train on its layers; QAT (hfquant.qat) simulates it
    trainable: ClassVar[bool] = True
    qat: ClassVar[bool] = False
    # why not, in words, where the answer is no (the errors name it)
    why_not_trainable: ClassVar[str] = ""
    why_not_qat: ClassVar[str] = "it is a calibration; QAT starts from round to nearest and trains instead"
    compileable: ClassVar[bool] = True
    # formats hfquant.interop.export can write its layers to; what its layers hold otherwise
    export_formats: ClassVar[tuple[str, ...]] = ()
    why_not_exportable: ClassVar[str] = ""
    # the checkpoint tensors of a layer, besides its bias (``<module>.<key>``)
    tensor_keys: ClassVar[tuple[str, ...]] = ("qweight", "scales", "zeros")
    # what settings missing from a format version 1 config mean (their defaults since changed)
    version1_settings: ClassVar[dict[str, Any]] = {}
    # fused MoE experts (3-D gate_up_proj / down_proj, hfquant.nn.QuantExperts): whether the
    # method quantizes them (empty_experts, quantize_experts); a model with experts is refused otherwise
    experts: ClassVar[bool] = False

    def __init__(self, config):
        self.config = config

    # ---- settings

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls.Settings))

    @classmethod
    def make_settings(cls, values: dict[str, Any]):
        """The Settings dataclass from the arguments given (defaults for the others): None stands
        for the default of a setting whose default is not None, lists of names or ints are copied
        into lists, and a ``calibration`` setting is completed from DEFAULT_CALIBRATION (with
        ``default_samples`` windows)."""
        fields = {f.name: f for f in dataclasses.fields(cls.Settings)}
        values = {k: v for k, v in values.items()
                  if v is not None or fields[k].default is None}
        for k, v in values.items():
            if cls.SETTING_TYPES.get(k) in ("names", "ints") and isinstance(v, (list, tuple)):
                values[k] = list(v)
        if "calibration" in fields:
            values["calibration"] = {**DEFAULT_CALIBRATION, "n_samples": cls.default_samples(values),
                                     **(values.get("calibration") or {})}
        return cls.Settings(**values)

    @classmethod
    def default_samples(cls, values: dict[str, Any]) -> int:
        """Calibration windows when ``calibration`` does not say (a method may make it depend on
        its other settings)."""
        return DEFAULT_CALIBRATION["n_samples"]

    def check_settings(self) -> None:
        """Raises ValueError naming a bad setting of this method (types first, then values)."""
        check_types(vars(self.settings), self.SETTING_TYPES, self.NONE_OK)
        if "calibration" in vars(self.settings):
            check_calibration(self.settings.calibration)

    @property
    def settings(self):
        return self.config.settings

    def check_scheme(self, where: str, bits, group_size, symmetric) -> None:
        """Raises unless (bits, group_size, symmetric) is a scheme of this method."""
        check_scheme_types(where, bits, group_size, symmetric)
        if bits not in self.bits_supported:
            raise ValueError(f"{where}: bits={bits!r} is not supported (use one of {self.bits_supported})")
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"{where}: group_size={group_size!r} is not supported "
                             f"(use one of {SUPPORTED_GROUP_SIZES})")

    def grid_args(self) -> dict:
        """grid / zero_point of the weight-only layers (methods without these settings: the
        version 1 grids, "range" and "integer")."""
        return {"grid": getattr(self.settings, "grid", "range"),
                "zero_point": getattr(self.settings, "zero_point", "integer")}

    def format_version(self) -> int:
        """The lowest checkpoint format version that holds this method's layers as configured."""
        return 1

    def to_dict(self) -> dict[str, Any]:
        """The method's settings as config.json holds them."""
        return {k: _plain(v) for k, v in vars(self.settings).items()}

    # ---- quantizing

    def needs_float_model(self) -> bool:
        """Whether quantizing needs the whole float model first (calibration, folding), instead of
        quantizing each weight as it loads."""
        return False

    def calibrate(self, model: nn.Module, targets, embeds, heads: dict[str, str], tokenizer=None) -> None:
        """Runs on the loaded float model before its layers are replaced (needs_float_model)."""

    def quantize_weight(self, name: str, module: nn.Module, weight) -> dict:
        """Quantize-on-load: the checkpoint tensors ({"qweight": ..., "scales": ...}) of the empty
        layer ``module`` (from empty_layer) for its float weight [out, in], as it loads. Methods
        that need the float model first (needs_float_model) never get here."""
        raise NotImplementedError(f"method {self.name!r} does not quantize weights as they load")

    def empty_layer(self, name: str, in_features: int, out_features: int, bias: bool, **common) -> nn.Module:
        """The layer ``name`` before its tensors load (usually on the meta device)."""
        raise NotImplementedError

    def quantize_layer(self, name: str, module: nn.Module, transposed: bool) -> nn.Module:
        """The quantized replacement of a float layer (after calibrate)."""
        raise NotImplementedError

    # ---- fused MoE experts

    def check_experts(self, name: str) -> None:
        """Raises unless the method quantizes fused experts (the module ``name``) as configured."""
        keep = f"modules_to_not_convert=[{name.rsplit('.', 1)[-1]!r}]"
        if not self.experts:
            raise ValueError(f"hfquant: {name} holds fused MoE experts, which method {self.name!r} cannot quantize "
                             f"yet; use method='rtn', or keep them in full precision with {keep}")
        zp = self.grid_args()["zero_point"]
        if zp != "integer" and not self.config.scheme_for(name)["symmetric"]:
            raise ValueError(f"hfquant: {name} holds fused MoE experts, which zero_point={zp!r} does not cover yet; "
                             f"use zero_point='integer', or keep them in full precision with {keep}")

    # The experts of every method that quantizes them are weight-only QuantExperts in the method's
    # scheme for the module, each expert matrix quantized by the method's quantize_weight.

    def empty_experts(self, name: str, module: nn.Module, shapes: dict, float_weights: bool) -> nn.Module:
        """The fused experts module ``name`` before its tensors load (``shapes`` from
        hfquant.nn.experts.expert_shapes; ``module`` the float experts module it replaces)."""
        from ..nn import QuantExperts

        self.check_experts(name)
        s = self.config.scheme_for(name)
        gu = module.gate_up_proj
        return QuantExperts(shapes["num_experts"], shapes["hidden"], shapes["intermediate"], shapes["bias"],
                            s["bits"], s["group_size"], s["symmetric"], transposed=shapes["transposed"],
                            dtype=gu.dtype, device=gu.device, original=module, float_weights=float_weights,
                            grid=self.grid_args()["grid"])

    def quantize_experts(self, name: str, module: nn.Module, proj: str, weight) -> dict:
        """Quantize-on-load: the stacked tensors ({"gate_up_qweight": ...}) of one float 3-D
        projection tensor (``proj`` "gate_up" or "down", as the model holds it) of the empty
        experts module ``module``, one expert at a time as the weight of a linear layer."""
        self.check_experts(name)
        return module.quantize_float(name, proj, weight, self.quantize_weight)

    def quantize_experts_module(self, name: str, module: nn.Module, num_experts: int) -> nn.Module:
        """The quantized replacement of a loaded float experts module (quantize_model)."""
        from ..nn import QuantExperts

        self.check_experts(name)
        s = self.config.scheme_for(name)
        return QuantExperts.from_float(module, num_experts, s["bits"], s["group_size"], s["symmetric"],
                                       quantize=self.quantize_weight, name=name, grid=self.grid_args()["grid"])

    # ---- naming

    def short_name(self) -> str:
        c = self.config
        g = "c" if c.group_size == -1 else f"g{c.group_size}"
        return f"w{c.bits}{g}{'' if c.symmetric else 'a'}"

    @classmethod
    def describe(cls, q: dict) -> str:
        """The weight scheme of a saved quantization_config of this method, in words."""
        bits, g = q.get("bits"), q.get("group_size")
        grain = "one scale per output channel (group_size -1)" if g == -1 else f"one scale per {g} input columns"
        return f"{bits}-bit weights, {grain}, " + ("symmetric" if q.get("symmetric") else "with zero points")


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return v
