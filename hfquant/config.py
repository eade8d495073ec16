"""HfQuantConfig: the quantization_config of hfquant for transformers.

The common settings (bits, group size, which modules, embeddings, the KV cache) live here;
each method's own settings live in its class in hfquant/methods/, which this shell builds
and delegates to. The JSON on disk is the same flat dict as in every earlier version."""
from __future__ import annotations

import copy
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .algorithms.rotation import ONLINE_ROTATIONS, check_rotation_args
from .kv_cache import check_kv_cache_args
from .methods import FORMAT_VERSION, get_method, method_names, methods_taking
from .methods.base import check_types
from .modeling import is_listed, overrides_for

DEFAULT_SKIP = ["lm_head"]
# the bits of the token embeddings (and a tied output head sharing them) of a config of fewer bits
# that leaves quantize_embeddings out: the output head reads the whole table every token, which
# at 8 bits costs no measurable perplexity (docs/accuracy.md) and reads a quarter of float32
EMBEDDINGS_AUTO_BITS = 8

# The common settings' types (None is accepted where the argument's default is None).
_TYPES = {
    **dict.fromkeys(("bits", "group_size", "format_version", "kv_cache_bits", "kv_cache_group_size",
                     "kv_cache_residual_length", "rotation_seed"), "int"),
    **dict.fromkeys(("symmetric", "quantize_embeddings"), "bool"),
    **dict.fromkeys(("method", "rotation", "kv_cache_rotation"), "str"),
    **dict.fromkeys(("modules_to_not_convert", "rotation_online"), "names"),
    **dict.fromkeys(("modules_override", "tied_modules"), "dict"),
}
_NONE_OK = {"bits", "group_size", "format_version", "kv_cache_bits", "kv_cache_group_size", "quantize_embeddings",
            "modules_to_not_convert", "modules_override", "tied_modules", "rotation", "kv_cache_rotation",
            "rotation_online"}
# attributes of the shell itself; every other public attribute is a setting of the method
_OWN = {"quant_method", "format_version", "bits", "group_size", "symmetric", "method", "modules_to_not_convert",
        "modules_override", "quantize_embeddings", "tied_modules", "kv_cache_bits", "kv_cache_group_size",
        "kv_cache_residual_length", "kv_cache_rotation", "rotation", "rotation_seed", "rotation_online", "settings",
        "impl"}


class HfQuantConfig(QuantizationConfigMixin):
    """Quantization settings, validated on construction.

    Args:
        bits: 2, 3, 4 or 8. Default: 4 for "rtn", 8 for the activation methods. 2- and
            3-bit codes are stored as bit streams and run on the 4-bit kernels.
        group_size: -1 (one scale per output channel) or 32, 64, 128, 256. The last group
            of a row may be shorter when it does not divide the layer's in_features.
            Default: 128 for "rtn", -1 for the activation methods.
        symmetric: symmetric codes (no zero point) or asymmetric with a per-group zero point.
        grid: for "rtn", symmetric: how each group's scale is placed. "best" (default, chosen on
            validation text: docs/accuracy.md) takes per group the one of "range" (the group's
            range, nothing clipped) and "extreme" (GGUF Q4_0's placement: the largest-magnitude
            weight on the lowest code, a signed scale) with the smaller squared error. "extreme"
            and "best" are checkpoint format version 2; a version 1 config means "range".
        zero_point: for "rtn", asymmetric: "integer" (default) or "float" (weight = code *
            scale + offset, GGUF Q4_1's grid; format version 2, CPU kernels only).
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
            calibration. Default: True (the choice measured on validation text for both methods:
            docs/accuracy.md); False gives the plain published schemes.
        calibration: {"text": path or None (WikiText-2 validation), "n_samples": 32 (128 for
            gptq/awq), "seq_len": 512} for the calibrating methods.
        act_order: for "gptq": process columns by decreasing Hessian diagonal and store the
            permutation (``<module>.perm``); default True.
        damp: for "gptq": dampening added to the Hessian diagonal, relative to its mean (0.01).
        clip_search: for "gptq"/"awq": choose each group's range by a grid search that may clip
            it (GPTQ's mse grid; AWQ's clipping search on calibration outputs); default True.
        kv_cache_bits: None (default) or 8, 4, 2: ``generate`` (and pipelines) of the loaded
            model use a QuantizedKVCache with these bits unless a cache is passed.
        kv_cache_group_size, kv_cache_residual_length: its group size (None: the largest of
            64, 32, 16, 8 dividing the model's head_dim) and full-precision window (128 tokens).
        kv_cache_rotation: "auto" (default: a Hadamard rotation of keys and values at 4 bits,
            none at 8 and 2), "hadamard" or None (QuantizedKVCache's ``rotation``).
        modules_to_not_convert: modules kept in full precision, with everything under them
            (``model.layers.1``, ``vision_tower``): whole names, their ends after a dot
            (``down_proj``), or ``re:<pattern>`` matched from the start of the name (re.match);
            a single string is one name. A key (but ``lm_head``) that names no module is an
            error when the model loads. Left out (None): ["lm_head"] plus, found when the model
            loads, the output heads tied to an embedding and the vision/audio encoders and
            multimodal projectors (``replace.default_skip``); saved as the expanded list.
        modules_override: per-module settings, ``{"model.layers.0.mlp.down_proj": {"bits": 8}}``;
            keys as for modules_to_not_convert (a block's entry applies to the layers under it;
            the entry naming the nearest module wins).
        quantize_embeddings: also quantize the token embeddings (nn.Embedding) with the
            scheme that applies to them (``scheme_for``; override per module as for linear
            layers). A tied lm_head then shares the quantized table (TiedQuantLinear: one
            copy, the output projection runs the W4/W8 GEMV on it) whether or not it is in
            modules_to_not_convert. Methods rtn, gptq, awq, mixed. Left out (None) with fewer
            than 8 bits (rtn, gptq, awq): True, with the embeddings at 8 bits (an entry
            ``{"bits": 8}`` per embedding added to modules_override as the model loads, unless
            one there sets their bits; saved so), which a tied lm_head shares: the decode step
            reads the head at 8 bits instead of float. Otherwise False.
        rotation: None (default) or "hadamard": before quantizing, fold the norm scales into the
            layers that follow them and rotate the residual stream (embedding, every block's input
            and output projections, lm_head) by a randomized Hadamard matrix, and v/o per head
            (hfquant/algorithms/rotation.py; QuaRot / SpinQuant style). The float model computes
            the same function; outliers spread over all channels. Llama-style RMSNorm pre-norm
            decoders only. Format version 2 (3 with online rotations); the checkpoint holds the
            rotated weights. An output head tied to the embedding is untied.
        rotation_seed: seed of the random signs of the rotation (default 0).
        rotation_online: the rotations applied as the model runs, which cannot be folded:
            ["down_proj"] (the default with a rotation: each dense MLP's down_proj input is
            rotated by a Hadamard transform, hfquant::hadamard_transform, and its weight holds
            the inverse) or []. Recorded in the checkpoint (format version 3) and installed
            again when it loads; a saved config without it has none.
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
        format_version: int | None = None,
        kv_cache_bits: int | None = None,
        kv_cache_group_size: int | None = None,
        kv_cache_residual_length: int = 128,
        kv_cache_rotation: str | None = "auto",
        quantize_embeddings: bool | None = None,
        tied_modules: dict[str, str] | None = None,
        rotation: str | None = None,
        rotation_seed: int = 0,
        rotation_online: list[str] | None = None,
        **settings,
    ):
        settings.pop("quant_method", None)
        # a single name is one name (list("lm_head") would be its letters)
        if isinstance(modules_to_not_convert, str):
            modules_to_not_convert = [modules_to_not_convert]
        check_types(locals(), _TYPES, _NONE_OK)
        cls = get_method(method)
        if format_version == 1:  # a version 1 checkpoint (or request): its settings' defaults of then
            settings = {**{k: v for k, v in cls.version1_settings.items() if k in cls.setting_names()},
                        **settings}
        _check_setting_names(cls, method, settings)
        object.__setattr__(self, "impl", None)
        self.quant_method = "hfquant"
        self.format_version = format_version
        self.method = method
        self.bits = cls.default_bits if bits is None else bits
        self.group_size = cls.default_group_size if group_size is None else group_size
        self.symmetric = symmetric
        self.settings = cls.make_settings(settings)
        object.__setattr__(self, "impl", cls(self))
        self.quantize_embeddings = cls.embeddings_default if quantize_embeddings is None else quantize_embeddings
        # left out with fewer than 8 bits: the embeddings at EMBEDDINGS_AUTO_BITS once the model is known
        # (replace.add_default_embeddings; the names it added); None: the user's choice stands
        self._auto_embed = [] if (quantize_embeddings is None and cls.embeddings and not cls.embeddings_default
                                  and cls.per_module_schemes and isinstance(self.bits, int)
                                  and self.bits < EMBEDDINGS_AUTO_BITS) else None
        self.tied_modules = dict(tied_modules or {})
        self.kv_cache_bits = kv_cache_bits
        self.kv_cache_group_size = kv_cache_group_size
        self.kv_cache_residual_length = kv_cache_residual_length
        self.kv_cache_rotation = kv_cache_rotation
        self.rotation = rotation
        self.rotation_seed = rotation_seed
        if isinstance(rotation_online, str):
            rotation_online = [rotation_online]
        self.rotation_online = (list(ONLINE_ROTATIONS) if rotation is not None else []) if rotation_online is None \
            else list(rotation_online)
        self.modules_to_not_convert = list(DEFAULT_SKIP if modules_to_not_convert is None else modules_to_not_convert)
        # the entries added for the model as it loads (replace.add_default_skip); None: the user's list stays as given
        self._auto_skip = [] if modules_to_not_convert is None else None
        self.modules_override = copy.deepcopy(modules_override) if modules_override else {}
        self.post_init()

    # the method's settings read and write as attributes of the config (config.damp)
    def __getattr__(self, name: str):
        if name.startswith("__") or "settings" not in self.__dict__:
            raise AttributeError(name)
        settings = self.__dict__["settings"]
        if name in vars(settings):
            return getattr(settings, name)
        raise AttributeError(f"HfQuantConfig: method {self.__dict__.get('method')!r} has no setting {name!r}")

    def __setattr__(self, name: str, value) -> None:
        settings = self.__dict__.get("settings")
        if settings is not None and name not in _OWN and name in vars(settings):
            setattr(settings, name, value)
        else:
            object.__setattr__(self, name, value)

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k != "impl":
                object.__setattr__(new, k, copy.deepcopy(v, memo))
        object.__setattr__(new, "impl", type(self.impl)(new))
        return new

    def post_init(self):
        check_types(vars(self), _TYPES, _NONE_OK)
        impl = self.impl
        if self.format_version is not None and self.format_version not in range(1, FORMAT_VERSION + 1):
            raise ValueError(
                f"HfQuantConfig: format_version={self.format_version!r} is not supported by this hfquant "
                f"(it reads format_version 1 to {FORMAT_VERSION}); upgrade hfquant to load this checkpoint"
            )
        get_method(self.method)
        impl.check_scheme("HfQuantConfig", self.bits, self.group_size, self.symmetric)
        impl.check_settings()
        check_rotation_args(self.rotation, self.rotation_seed, self.rotation_online)
        needed = max(impl.format_version(), self._rotation_version())
        if self.format_version is None:
            self.format_version = needed
        elif self.format_version < needed and self.rotation and impl.format_version() <= self.format_version:
            raise ValueError(f"HfQuantConfig: format_version={self.format_version} cannot hold a rotated model "
                             f"(rotation={self.rotation!r}): it needs format_version {needed}")
        elif self.format_version < needed:
            raise ValueError(f"HfQuantConfig: format_version={self.format_version} cannot hold this scheme "
                             f"({self.short_name}, {impl.to_dict()}): it needs format_version {needed}")
        if self.kv_cache_bits is not None:
            try:
                check_kv_cache_args(self.kv_cache_bits, self.kv_cache_group_size, self.kv_cache_residual_length,
                                    self.kv_cache_rotation)
            except ValueError as e:
                raise ValueError(f"HfQuantConfig: kv_cache_bits / kv_cache_group_size / kv_cache_residual_length / "
                                 f"kv_cache_rotation: "
                                 f"{e}") from None
        if self.quantize_embeddings and not impl.embeddings:
            raise ValueError(f"HfQuantConfig: quantize_embeddings is supported with methods "
                             f"{_methods_where(lambda m: m.embeddings)}, not {self.method!r}")
        if not isinstance(self.tied_modules, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.tied_modules.items()):
            raise ValueError("HfQuantConfig: tied_modules must be a dict {lm_head name: embedding name}")
        if self.tied_modules and not self.quantize_embeddings:
            raise ValueError("HfQuantConfig: tied_modules is set but quantize_embeddings is False")
        if self.modules_override and not impl.per_module_schemes:
            raise ValueError(f"HfQuantConfig: modules_override is not supported with method={self.method!r}")
        for name, over in self.modules_override.items():
            if not isinstance(over, dict) or set(over) - {"bits", "group_size", "symmetric"}:
                raise ValueError(
                    f"HfQuantConfig: modules_override[{name!r}] must be a dict with keys among "
                    f"bits, group_size, symmetric; got {over!r}"
                )
            s = self.scheme_for(name)
            impl.check_scheme(f"HfQuantConfig: modules_override[{name!r}]", s["bits"], s["group_size"],
                              s["symmetric"])

    def _rotation_version(self) -> int:
        # rotated checkpoints are format version 2; with online rotations 3 (a release reading
        # at most 2 would load them without the online transforms: it refuses version 3)
        return 3 if self.rotation_online else 2 if self.rotation else 1

    @property
    def needs_float_model(self) -> bool:
        """Whether quantizing needs the whole float model first (calibration, the norm-scale
        fold, a rotation), instead of quantizing each weight as it loads."""
        return self.impl.needs_float_model() or self.rotation is not None

    def scheme_for(self, module_name: str) -> dict[str, Any]:
        """The bits / group_size / symmetric that apply to one module."""
        scheme = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        for over in overrides_for(module_name, self.modules_override):
            scheme.update(over)
        return scheme

    def is_skipped(self, module_name: str) -> bool:
        return is_listed(module_name, self.modules_to_not_convert)

    @staticmethod
    def is_listed(module_name: str, keys) -> bool:
        """Whether a list of keys (modeling.name_matches) names this module or a parent."""
        return is_listed(module_name, keys)

    def to_dict(self) -> dict[str, Any]:
        version = max(self.format_version or 1, self.impl.format_version(), self._rotation_version())
        d = {
            "quant_method": "hfquant",
            "format_version": version,
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "modules_override": copy.deepcopy(self.modules_override),
            **self.impl.to_dict(),
        }
        if version == 1:  # a version 1 checkpoint reads in releases that know only version 1's settings
            for key in self.impl.version1_settings:
                d.pop(key, None)
        if self.quantize_embeddings:
            d["quantize_embeddings"] = True
            d["tied_modules"] = dict(self.tied_modules)
        elif self.impl.embeddings_default:
            d["quantize_embeddings"] = False  # not the method's default: say so
        if self.kv_cache_bits is not None:
            d["kv_cache_bits"] = self.kv_cache_bits
            d["kv_cache_group_size"] = self.kv_cache_group_size
            d["kv_cache_residual_length"] = self.kv_cache_residual_length
            if self.kv_cache_rotation != "auto":  # the default is left out (configs before it read back the same)
                d["kv_cache_rotation"] = self.kv_cache_rotation
        if self.rotation is not None:  # rotated checkpoints are format version 2 (3 with online rotations)
            d["rotation"] = self.rotation
            d["rotation_seed"] = self.rotation_seed
            if self.rotation_online:
                d["rotation_online"] = list(self.rotation_online)
        return d

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        # a saved config without quantize_embeddings did not quantize them: to_dict writes True
        # whenever they were (earlier versions also left out False for "mixed", whose default is True)
        # likewise a saved config without rotation_online has no online rotations (format version 2)
        config_dict = {"quantize_embeddings": False, "rotation_online": [], **config_dict}
        return super().from_dict(config_dict, return_unused_kwargs, **kwargs)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @property
    def short_name(self) -> str:
        return self.impl.short_name()


def _methods_where(pred) -> tuple[str, ...]:
    return tuple(n for n in method_names() if pred(get_method(n)))


def _check_setting_names(cls, method: str, settings: dict) -> None:
    """ValueError for an argument that is no setting of this method: which methods take it, or
    that none does."""
    own = set(cls.setting_names())
    unknown = sorted(k for k in settings if k not in own and not methods_taking(k))
    if unknown:
        raise ValueError(f"HfQuantConfig: unknown argument(s) {unknown}")
    for key, value in settings.items():  # a value of the wrong type is named first, whichever method
        m = cls if key in own else get_method(methods_taking(key)[0])
        kind = m.SETTING_TYPES.get(key)
        if kind == "names" and isinstance(value, str):
            settings[key] = value = [value]  # a single name is one name
        if kind is not None:
            check_types({key: value}, {key: kind}, m.NONE_OK)
    for key in settings:
        if key not in own:
            raise ValueError(f"HfQuantConfig: {key} applies to methods {tuple(methods_taking(key))}, not {method!r}")
