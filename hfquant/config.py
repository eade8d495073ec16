"""HfQuantConfig: the quantization_config of hfquant for transformers."""
from __future__ import annotations

import copy
import math
import os
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

FORMAT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128, 256)
SUPPORTED_METHODS = ("rtn", "gptq", "awq", "llm_int8", "w8a8", "kmeans", "mixed")
# Methods that quantize activations too (int8 per token at run time): int8 per-channel
# symmetric weights only.
ACTIVATION_METHODS = ("llm_int8", "w8a8")
# Weight-only methods calibrated on data, layer by layer, after the float model has loaded.
CALIBRATED_METHODS = ("gptq", "awq")
DEFAULT_CALIBRATION = {"text": None, "n_samples": 32, "seq_len": 512}
# GPTQ and AWQ calibrate on more windows by default (the papers' 128)
DEFAULT_CALIBRATED_SAMPLES = 128
DEFAULT_SKIP = ["lm_head"]
# Weight clustering ("kmeans"): 2^bits centroids per row (group_size -1) or per row and group.
KMEANS_BITS = (2, 3, 4)
KMEANS_INITS = ("uniform", "quantile", "kmeans++")
# Methods whose layers are QuantLinear (format v1 weights): they can quantize embeddings too.
EMBEDDING_METHODS = ("rtn", "gptq", "awq", "mixed")
# Mixed precision ("mixed"): bits per layer from sensitivity under an average-bits budget.
MIXED_SENSITIVITIES = ("fisher", "variance")
MIXED_BASES = ("rtn", "gptq")
DEFAULT_MIXED_BITS = [2, 3, 4, 8]
DEFAULT_MIXED_SAMPLES = 16


class HfQuantConfig(QuantizationConfigMixin):
    """Quantization settings, validated on construction.

    Args:
        bits: 2, 3, 4 or 8. Default: 4 for "rtn", 8 for the activation methods. 2- and
            3-bit codes are stored as bit streams and run on the 4-bit kernels.
        group_size: -1 (one scale per output channel) or 32, 64, 128, 256. The last group
            of a row may be shorter when it does not divide the layer's in_features.
            Default: 128 for "rtn", -1 for the activation methods.
        symmetric: symmetric codes (no zero point) or asymmetric with a per-group zero point.
        method: "rtn" (weight-only, round to nearest, quantized while the weights load);
            "gptq" (weight-only, GPTQ: second-order error compensation calibrated layer by
            layer on ``calibration`` text after the float model loaded); "awq" (weight-only,
            activation-aware per-channel scaling searched on calibration text, folded into
            the previous op, then round to nearest); "w8a8" (int8 weights per channel, int8 activations per token, quantized at run
            time); "llm_int8" (as w8a8, but input columns holding a value with
            |x| >= llm_int8_threshold are multiplied in floating point: LLM.int8()).
        llm_int8_threshold: outlier threshold of "llm_int8" (default 6.0); 0 turns outlier
            detection off (plain W8A8), inf keeps only NaN/Inf columns apart.
        smoothquant_alpha: for "w8a8"/"llm_int8": calibrate SmoothQuant factors with this
            migration strength (0..1, 0.5 is the paper's default) while loading a float model;
            None (default) = no smoothing.
        fold_norms: for "w8a8"/"llm_int8" without SmoothQuant: move the scale weights of
            the pre-norms (RMSNorm/LayerNorm before q/k/v and gate/up) into the weights that
            follow them, so that per-token int8 quantization sees the normalised residual
            stream rather than channels the norm amplified. Exact for the float model, no
            calibration. Default: True for "llm_int8" (measured +0.47% instead of +1.50% on
            the default model), False for "w8a8" (+3.41% instead of +3.15%); False gives
            the plain published schemes.
        calibration: {"text": path or None (WikiText-2 validation), "n_samples": 32 (128 for
            gptq/awq), "seq_len": 512} for the calibrating methods.
        act_order: for "gptq": process columns by decreasing Hessian diagonal and store the
            permutation (``<module>.perm``); default True.
        damp: for "gptq": dampening added to the Hessian diagonal, relative to its mean (0.01).
        clip_search: for "gptq"/"awq": choose each group's range by a grid search that may clip
            it (GPTQ's mse grid; AWQ's clipping search on calibration outputs); default True.
        kv_cache_bits: None (default) or 8, 4, 2: ``generate`` (and pipelines) of the loaded
            model use a QuantizedKVCache with these bits unless a cache is passed.
        kv_cache_group_size, kv_cache_residual_length: its group size (64) and full-precision
            window (128 tokens).
        modules_to_not_convert: module names (exact, or a suffix after a dot) kept in full
            precision; a single string is one name. Defaults to ["lm_head"]. A name other than
            lm_head that matches no linear layer or embedding of the model is an error when the
            model loads.
        modules_override: per-module settings, ``{"model.layers.0.mlp.down_proj": {"bits": 8}}``;
            keys are module names (exact, or a suffix after a dot).
        quantize_embeddings: also quantize the token embeddings (nn.Embedding) with the
            scheme that applies to them (``scheme_for``; override per module as for linear
            layers). A tied lm_head then shares the quantized table (TiedQuantLinear: one
            copy, the output projection runs the W4/W8 GEMV on it) whether or not it is in
            modules_to_not_convert. Methods rtn, gptq, awq, mixed. Default False.
        tied_modules: filled while quantizing: {lm_head name: embedding name} of the output
            projections that share a quantized embedding (so reloading can rebuild the tie).

    Mixed precision, ``method="mixed"`` (calibrated after the float model loads): each layer
    (and, by default, the token embedding with a tied lm_head) gets bits from ``mixed_bits``
    so that the stored bits per weight (codes, scales and zero points, embeddings included)
    average at most ``target_bits``, choosing where quantization hurts least
    (algorithms/mixed.py). The choice is written into ``modules_override`` (user entries
    there are kept fixed), so the checkpoint reloads without calibration.
        target_bits: the budget in stored bits per weight (default 4.5).
        mixed_bits: the bit widths to choose from (default [2, 3, 4, 8]).
        sensitivity: "fisher" (default: loss change estimated from one forward/backward pass
            over ``calibration``, 16 windows by default) or "variance" (data free).
        mixed_base: how each layer is quantized at its bits: "rtn" (default) or "gptq".

    Weight clustering, ``method="kmeans"`` (data-free, quantized while the weights load):
    bits 2, 3 or 4 give 2^bits centroids per output row (group_size -1, the default for
    this method) or per row and group (32..256); each weight is stored as the index of its
    centroid and the layer runs a lookup-table kernel. ``symmetric`` does not apply.
        kmeans_init: "uniform" (default: the asymmetric round-to-nearest grid, which Lloyd's
            iterations only improve), "quantile" or "kmeans++" (seeded with kmeans_seed).
        kmeans_max_iter: cap on Lloyd iterations (default 100; they stop when no
            assignment changes).
        kmeans_seed: seed of the "kmeans++" initialisation (default 0).
    """

    def __init__(
        self,
        bits: int | None = None,
        group_size: int | None = None,
        symmetric: bool = True,
        method: str = "rtn",
        modules_to_not_convert: list[str] | None = None,
        modules_override: dict[str, dict[str, Any]] | None = None,
        format_version: int = FORMAT_VERSION,
        llm_int8_threshold: float = 6.0,
        smoothquant_alpha: float | None = None,
        fold_norms: bool | None = None,
        calibration: dict[str, Any] | None = None,
        smooth_modules: list[str] | None = None,
        kv_cache_bits: int | None = None,
        kv_cache_group_size: int = 64,
        kv_cache_residual_length: int = 128,
        act_order: bool = True,
        damp: float = 0.01,
        clip_search: bool = True,
        kmeans_init: str = "uniform",
        kmeans_max_iter: int = 100,
        kmeans_seed: int = 0,
        quantize_embeddings: bool | None = None,
        tied_modules: dict[str, str] | None = None,
        target_bits: float = 4.5,
        mixed_bits: list[int] | None = None,
        sensitivity: str = "fisher",
        mixed_base: str = "rtn",
        **kwargs,
    ):
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(f"HfQuantConfig: unknown argument(s) {sorted(kwargs)}")
        # a single name is one name (list("lm_head") would be its letters)
        if isinstance(modules_to_not_convert, str):
            modules_to_not_convert = [modules_to_not_convert]
        if isinstance(smooth_modules, str):
            smooth_modules = [smooth_modules]
        _check_types(locals())
        self.quant_method = "hfquant"
        self.format_version = format_version
        if bits is None:
            bits = 8 if method in ACTIVATION_METHODS else 4
        self.bits = bits
        if group_size is None and method == "kmeans":
            group_size = -1
        if group_size is None:
            group_size = -1 if method in ACTIVATION_METHODS else 128
        self.group_size = group_size
        self.symmetric = symmetric
        self.method = method
        self.llm_int8_threshold = llm_int8_threshold
        self.smoothquant_alpha = smoothquant_alpha
        self.fold_norms = (method == "llm_int8") if fold_norms is None else fold_norms
        defaults = dict(DEFAULT_CALIBRATION)
        if method in CALIBRATED_METHODS:
            defaults["n_samples"] = DEFAULT_CALIBRATED_SAMPLES
        if method == "mixed":
            defaults["n_samples"] = DEFAULT_CALIBRATED_SAMPLES if mixed_base == "gptq" else DEFAULT_MIXED_SAMPLES
        self.calibration = {**defaults, **(calibration or {})}
        self.act_order = act_order
        self.damp = damp
        self.clip_search = clip_search
        # Filled when SmoothQuant runs: modules whose factors are applied inside the op
        # (stored as <module>.smooth) because no previous op could absorb them.
        self.smooth_modules = list(smooth_modules or [])
        self.kv_cache_bits = kv_cache_bits
        self.kv_cache_group_size = kv_cache_group_size
        self.kv_cache_residual_length = kv_cache_residual_length
        self.kmeans_init = kmeans_init
        self.kmeans_max_iter = kmeans_max_iter
        self.kmeans_seed = kmeans_seed
        self.quantize_embeddings = (method == "mixed") if quantize_embeddings is None else quantize_embeddings
        self.target_bits = target_bits
        self.mixed_bits = list(DEFAULT_MIXED_BITS if mixed_bits is None else mixed_bits)
        self.sensitivity = sensitivity
        self.mixed_base = mixed_base
        self.tied_modules = dict(tied_modules or {})
        self.modules_to_not_convert = list(DEFAULT_SKIP if modules_to_not_convert is None else modules_to_not_convert)
        self.modules_override = copy.deepcopy(modules_override) if modules_override else {}
        self.post_init()

    def post_init(self):
        _check_types(vars(self))
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"HfQuantConfig: format_version={self.format_version!r} is not supported by this hfquant "
                f"(it reads format_version {FORMAT_VERSION}); upgrade hfquant to load this checkpoint"
            )
        if self.method not in SUPPORTED_METHODS:
            raise ValueError(f"HfQuantConfig: method={self.method!r} is not supported (use one of {SUPPORTED_METHODS})")
        check = _check_kmeans_scheme if self.method == "kmeans" else _check_scheme
        check("HfQuantConfig", self.bits, self.group_size, self.symmetric)
        if self.method == "kmeans":
            self._check_kmeans()
        if self.kv_cache_bits is not None:
            from .kv_cache import _check_args

            try:
                _check_args(self.kv_cache_bits, self.kv_cache_group_size, self.kv_cache_residual_length)
            except ValueError as e:
                raise ValueError(f"HfQuantConfig: kv_cache_bits / kv_cache_group_size / kv_cache_residual_length: "
                                 f"{e}") from None
        if self.method in ACTIVATION_METHODS:
            self._check_activation_method()
        elif self.method in CALIBRATED_METHODS:
            self._check_calibrated_method()
        elif self.method == "mixed":
            self._check_mixed()
        if self.method not in ACTIVATION_METHODS and self.smoothquant_alpha is not None:
            raise ValueError(f"HfQuantConfig: smoothquant_alpha applies to methods {ACTIVATION_METHODS}, "
                             f"not {self.method!r}")
        if not isinstance(self.quantize_embeddings, bool):
            raise ValueError(f"HfQuantConfig: quantize_embeddings must be True or False, got "
                             f"{self.quantize_embeddings!r}")
        if self.quantize_embeddings and self.method not in EMBEDDING_METHODS:
            raise ValueError(f"HfQuantConfig: quantize_embeddings is supported with methods {EMBEDDING_METHODS}, "
                             f"not {self.method!r}")
        if not isinstance(self.tied_modules, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.tied_modules.items()):
            raise ValueError("HfQuantConfig: tied_modules must be a dict {lm_head name: embedding name}")
        if self.tied_modules and not self.quantize_embeddings:
            raise ValueError("HfQuantConfig: tied_modules is set but quantize_embeddings is False")
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
            check(f"HfQuantConfig: modules_override[{name!r}]", s["bits"], s["group_size"], s["symmetric"])

    def _check_activation_method(self) -> None:
        m = self.method
        if self.bits != 8 or self.group_size != -1 or not self.symmetric:
            raise ValueError(f"HfQuantConfig: method={m!r} uses int8 symmetric per-channel weights: set bits=8, "
                             f"group_size=-1, symmetric=True (got bits={self.bits}, group_size={self.group_size}, "
                             f"symmetric={self.symmetric})")
        if self.modules_override:
            raise ValueError(f"HfQuantConfig: modules_override is not supported with method={m!r}")
        t = self.llm_int8_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise ValueError(f"HfQuantConfig: llm_int8_threshold={t!r} must be a number >= 0 "
                             "(0 turns outlier detection off)")
        if not isinstance(self.fold_norms, bool):
            raise ValueError(f"HfQuantConfig: fold_norms must be True or False, got {self.fold_norms!r}")
        a = self.smoothquant_alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1):
            raise ValueError(f"HfQuantConfig: smoothquant_alpha={a!r} must be a number in [0, 1] (or None)")
        self._check_calibration()
        if not isinstance(self.smooth_modules, list) or not all(isinstance(n, str) for n in self.smooth_modules):
            raise ValueError("HfQuantConfig: smooth_modules must be a list of module names")

    def _check_calibrated_method(self) -> None:
        self._check_calibration()
        for key in ("act_order", "clip_search"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"HfQuantConfig: {key} must be True or False, got {getattr(self, key)!r}")
        d = self.damp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise ValueError(f"HfQuantConfig: damp={d!r} must be a number in (0, 1]")

    def _check_mixed(self) -> None:
        t = self.target_bits
        mb = self.mixed_bits
        if not isinstance(mb, (list, tuple)) or not mb or any(isinstance(b, bool) or b not in SUPPORTED_BITS
                                                              for b in mb) or len(set(mb)) != len(mb):
            raise ValueError(f"HfQuantConfig: mixed_bits={mb!r} must be a list of distinct bit widths among "
                             f"{SUPPORTED_BITS}")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < min(mb):
            raise ValueError(f"HfQuantConfig: target_bits={t!r} is impossible: every layer takes at least "
                             f"{min(mb)} bits per weight (plus scales) with mixed_bits={mb}")
        if self.sensitivity not in MIXED_SENSITIVITIES:
            raise ValueError(f"HfQuantConfig: sensitivity={self.sensitivity!r} is not supported "
                             f"(use one of {MIXED_SENSITIVITIES})")
        if self.mixed_base not in MIXED_BASES:
            raise ValueError(f"HfQuantConfig: mixed_base={self.mixed_base!r} is not supported (use one of {MIXED_BASES})")
        self._check_calibrated_method()

    def _check_calibration(self) -> None:
        c = self.calibration
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

    def _check_kmeans(self) -> None:
        if self.kmeans_init not in KMEANS_INITS:
            raise ValueError(f"HfQuantConfig: kmeans_init={self.kmeans_init!r} is not supported "
                             f"(use one of {KMEANS_INITS})")
        for key in ("kmeans_max_iter", "kmeans_seed"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "kmeans_max_iter" else 0):
                raise ValueError(f"HfQuantConfig: {key}={v!r} must be an integer >= "
                                 f"{1 if key == 'kmeans_max_iter' else 0}")

    @property
    def threshold(self) -> float:
        """The outlier threshold the int8 layers run with (0 for w8a8)."""
        return float(self.llm_int8_threshold) if self.method == "llm_int8" else 0.0

    @property
    def needs_float_model(self) -> bool:
        """Whether quantizing needs the whole float model first (SmoothQuant calibration, or
        the norm-scale fold), instead of quantizing each weight as it loads."""
        if self.method in CALIBRATED_METHODS or self.method == "mixed":
            return True
        return self.method in ACTIVATION_METHODS and (self.smoothquant_alpha is not None or self.fold_norms)

    def scheme_for(self, module_name: str) -> dict[str, Any]:
        """The bits / group_size / symmetric that apply to one module."""
        scheme = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        for key, over in self.modules_override.items():
            if _name_matches(module_name, key):
                scheme.update(over)
        return scheme

    def is_skipped(self, module_name: str) -> bool:
        return self.is_listed(module_name, self.modules_to_not_convert)

    @staticmethod
    def is_listed(module_name: str, keys) -> bool:
        """Whether a list of module names (exact, or a suffix after a dot) names this module."""
        return any(_name_matches(module_name, key) for key in keys)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "quant_method": "hfquant",
            "format_version": self.format_version,
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "modules_override": copy.deepcopy(self.modules_override),
        }
        if self.method in ACTIVATION_METHODS:
            d["llm_int8_threshold"] = self.llm_int8_threshold
            d["smoothquant_alpha"] = self.smoothquant_alpha
            d["fold_norms"] = self.fold_norms
            d["calibration"] = copy.deepcopy(self.calibration)
            d["smooth_modules"] = list(self.smooth_modules)
        if self.method in CALIBRATED_METHODS:
            d["calibration"] = copy.deepcopy(self.calibration)
            d["clip_search"] = self.clip_search
            if self.method == "gptq":
                d["act_order"] = self.act_order
                d["damp"] = self.damp
        if self.method == "mixed":
            d["calibration"] = copy.deepcopy(self.calibration)
            d["target_bits"] = self.target_bits
            d["mixed_bits"] = list(self.mixed_bits)
            d["sensitivity"] = self.sensitivity
            d["mixed_base"] = self.mixed_base
            d["clip_search"] = self.clip_search
            if self.mixed_base == "gptq":
                d["act_order"] = self.act_order
                d["damp"] = self.damp
        if self.method == "kmeans":
            d["kmeans_init"] = self.kmeans_init
            d["kmeans_max_iter"] = self.kmeans_max_iter
            d["kmeans_seed"] = self.kmeans_seed
        if self.quantize_embeddings:
            d["quantize_embeddings"] = True
            d["tied_modules"] = dict(self.tied_modules)
        if self.kv_cache_bits is not None:
            d["kv_cache_bits"] = self.kv_cache_bits
            d["kv_cache_group_size"] = self.kv_cache_group_size
            d["kv_cache_residual_length"] = self.kv_cache_residual_length
        return d

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @property
    def short_name(self) -> str:
        if self.method in ACTIVATION_METHODS:
            sq = "" if self.smoothquant_alpha is None else f"-sq{self.smoothquant_alpha:g}"
            return f"{self.method}{sq}"
        g = "c" if self.group_size == -1 else f"g{self.group_size}"
        if self.method == "kmeans":
            return f"km{self.bits}{g}"
        if self.method == "mixed":
            base = "" if self.mixed_base == "rtn" else f"-{self.mixed_base}"
            return f"mixed{self.target_bits:g}{g}{'' if self.symmetric else 'a'}{base}"
        name = f"w{self.bits}{g}{'' if self.symmetric else 'a'}"
        return name if self.method == "rtn" else f"{self.method}-{name}"


# The type each setting must have (None is accepted where the argument's default is None).
_TYPES = {
    **dict.fromkeys(("bits", "group_size", "format_version", "kv_cache_bits", "kv_cache_group_size",
                     "kv_cache_residual_length", "kmeans_max_iter", "kmeans_seed"), "int"),
    **dict.fromkeys(("symmetric", "act_order", "clip_search", "fold_norms", "quantize_embeddings"), "bool"),
    **dict.fromkeys(("llm_int8_threshold", "smoothquant_alpha", "damp", "target_bits"), "number"),
    **dict.fromkeys(("method", "kmeans_init", "sensitivity", "mixed_base"), "str"),
    **dict.fromkeys(("modules_to_not_convert", "smooth_modules"), "names"),
    **dict.fromkeys(("modules_override", "calibration", "tied_modules"), "dict"),
    "mixed_bits": "ints",
}
_NONE_OK = {"bits", "group_size", "kv_cache_bits", "fold_norms", "quantize_embeddings", "smoothquant_alpha",
            "modules_to_not_convert", "smooth_modules", "modules_override", "calibration", "tied_modules",
            "mixed_bits"}
_EXPECTED = {"int": "an int", "bool": "True or False", "number": "a number", "str": "a str",
             "names": "a list of module names", "dict": "a dict", "ints": "a list of ints"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _type_ok(kind: str, v) -> bool:
    if kind == "int":
        return _is_int(v)
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
    return isinstance(v, (list, tuple)) and all(_is_int(b) for b in v)  # ints


def _check_types(values: dict[str, Any]) -> None:
    """ValueError naming the first setting of the wrong type, the type expected and the one given."""
    for key, kind in _TYPES.items():
        v = values.get(key)
        if v is None and key in _NONE_OK or _type_ok(kind, v):
            continue
        raise ValueError(f"HfQuantConfig: {key} must be {_EXPECTED[kind]}, got {v!r} ({type(v).__name__})")


def _name_matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _check_scheme_types(where: str, bits, group_size, symmetric) -> None:
    for key, v in (("bits", bits), ("group_size", group_size)):
        if not _is_int(v):
            raise ValueError(f"{where}: {key} must be an int, got {v!r} ({type(v).__name__})")
    if not isinstance(symmetric, bool):
        raise ValueError(f"{where}: symmetric must be True or False, got {symmetric!r}")


def _check_scheme(where: str, bits, group_size, symmetric) -> None:
    _check_scheme_types(where, bits, group_size, symmetric)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{where}: bits={bits!r} is not supported (use one of {SUPPORTED_BITS})")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{where}: group_size={group_size!r} is not supported (use one of {SUPPORTED_GROUP_SIZES})")


def _check_kmeans_scheme(where: str, bits, group_size, symmetric) -> None:
    _check_scheme_types(where, bits, group_size, symmetric)
    if bits not in KMEANS_BITS:
        raise ValueError(f"{where}: bits={bits!r} is not supported by method 'kmeans' (use one of {KMEANS_BITS})")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{where}: group_size={group_size!r} is not supported (use one of {SUPPORTED_GROUP_SIZES})")
    if symmetric is not True:
        raise ValueError(f"{where}: symmetric={symmetric!r} does not apply to method 'kmeans' (codebooks have no "
                         "zero point); leave it True")
