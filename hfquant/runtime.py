"""Run-time switches of the kernels and backends: ``hfquant.settings``.

One typed object holds every switch. Reading ``hfquant.settings.<name>`` gives its value;
assigning checks the value and takes effect at once (the native switches live in the
extension, whose kernels read them each time they choose a path).
``with hfquant.settings(backend="ref", gemv_max_m=0): ...`` sets switches for a block and
restores the previous values when it ends, also on an exception. The environment variables
``HFQUANT_<NAME>`` (``HFQUANT_BACKEND``, ``HFQUANT_ISA``, ...) seed the values once, when
hfquant loads; later changes to the environment have no effect. Switches are process-wide,
not per thread.
"""
from __future__ import annotations

import contextlib
import numbers
import os
from typing import Any, Callable, Iterator, Mapping

from ._ext import _C

_BOOL_TEXT = {"1": True, "true": True, "0": False, "false": False}


class Switch:
    """One switch of :class:`Settings`: its type, default (today's behaviour), allowed values and
    one-line doc. ``native`` names the extension's getter and setter; ``None`` in Python is -1 there."""

    def __init__(self, kind: type, default: Any, doc: str, *,
                 choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
                 minimum: int | None = None, maximum: int | None = None, none: str | None = None,
                 native: tuple[str, str] | None = None) -> None:
        self.kind, self.default, self.doc = kind, default, doc
        self._choices, self.minimum, self.maximum, self.none = choices, minimum, maximum, none
        self.native = native
        self.name = self.env = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.env = "HFQUANT_" + name.upper()

    def choices(self) -> tuple[str, ...] | None:
        return self._choices() if callable(self._choices) else self._choices

    def allowed(self, env: bool = False) -> str:
        """The allowed values in words (for an environment variable: as text)."""
        choices = self.choices()
        if choices is not None:
            return ", ".join(choices if env else map(repr, choices))
        if self.kind is bool:
            return "1, 0, true or false" if env else "True or False"
        if self.maximum is not None:
            text = f"an integer from {self.minimum} to {self.maximum}"
        else:
            text = f"an integer of at least {self.minimum}"
        return text if self.none is None or env else f"None ({self.none}) or {text}"

    def check(self, value: Any) -> Any:
        """The value, normalized; ValueError naming the switch, the value and what is allowed."""
        ok = False
        if value is None:
            ok = self.none is not None
        elif self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is int:
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                value = int(value)
                ok = value >= self.minimum and (self.maximum is None or value <= self.maximum)
        else:
            ok = isinstance(value, str) and value in self.choices()
        if not ok:
            raise ValueError(f"hfquant: settings.{self.name}={value!r} is not allowed (allowed: {self.allowed()})")
        return value

    def from_env(self, text: str) -> Any:
        """The value an environment variable's text gives; ValueError naming the variable."""
        try:
            if self.kind is bool:
                value = _BOOL_TEXT[text.strip().lower()]
            elif self.kind is int:
                value = int(text.strip())
            else:
                value = text.strip()
            return self.check(value)
        except (KeyError, ValueError):
            raise ValueError(f"hfquant: environment variable {self.env}={text!r} is not valid "
                             f"(allowed: {self.allowed(env=True)})") from None

    def __get__(self, obj: Settings | None, owner: type) -> Any:
        if obj is None:
            return self
        if self.native is None:
            return obj._values[self.name]
        value = getattr(_C, self.native[0])()
        return None if self.none is not None and value == -1 else value

    def __set__(self, obj: Settings, value: Any) -> None:
        value = self.check(value)
        if self.native is None:
            obj._values[self.name] = value
        else:
            getattr(_C, self.native[1])(-1 if value is None else value)


class Settings:
    """The kernel and backend switches (use the one instance, ``hfquant.settings``)."""

    backend = Switch(str, "native", "hfquant.ops wrappers: 'native' runs the compiled kernels, 'ref' the "
                     "pure-torch twins in hfquant/ref.py.", choices=("native", "ref"))
    isa = Switch(str, "auto", "CPU kernel path: 'auto' (the best this CPU runs) or one this CPU runs, forced.",
                 choices=lambda: ("auto", *_C.available_isas()), native=("cpu_isa_setting", "set_cpu_isa"))
    int8_path = Switch(str, "auto", "CPU int8 GEMM kernel: 'auto' (follows the kernel path) or one this CPU "
                       "runs, forced.", choices=lambda: ("auto", *_C.available_int8_paths()),
                       native=("int8_path_setting", "set_int8_path"))
    gemv_max_m = Switch(int, None, "CPU qlinear and lut_linear: largest M served by the GEMV kernels; larger M "
                        "takes the Gemm or blocked path.", minimum=0, none="chosen per kernel path, dtype and "
                        "layer size", native=("gemv_max_m", "set_gemv_max_m"))
    gemm_min_m = Switch(int, None, "CPU qlinear: smallest M of the register-blocked Gemm path (when gemv_max_m "
                        "is None).", minimum=1, none="chosen per kernel path and bits",
                        native=("gemm_min_m", "set_gemm_min_m"))
    block_rows = Switch(int, None, "CPU qlinear: weight rows dequantized per GEMM call on the blocked path "
                        "(rounded down to a multiple of 4, at least 4).", minimum=1, none="about 16 MiB of rows",
                        native=("block_rows", "set_block_rows"))
    int8_activations_min_m = Switch(int, 16, "CPU weight-only 4-bit layers (QuantLinear, QuantExperts): calls "
                                    "of at least this many rows (tokens) run with int8 activations in blocks of 32 "
                                    "(hfquant::qlinear_a8, qlinear_routed_a8; VNNI dot products). The default 16: "
                                    "prefill, where they are faster at a measured perplexity cost of at most 0.3% "
                                    "(docs/benchmarks.md, int8-activations); decode steps stay weight-only. 1 "
                                    "includes decode.",
                                    minimum=1,
                                    none="off: activations stay in their float dtype")
    generate_cache = Switch(str, "auto", "The cache generate gives a hfquant model when the caller passes none: "
                            "'auto' is the QuantizedKVCache of the model's kv_cache_bits, else transformers' "
                            "DynamicCache appending in place into preallocated buffers (hfquant/generation.py); "
                            "'transformers' is transformers' own choice.", choices=("auto", "transformers"))
    fused_ops = Switch(bool, True, "hfquant models on the CPU: RMSNorm modules whose forward was checked to "
                       "compute Llama's formula run hfquant::rms_norm at inference (hfquant/fusion.py); False: "
                       "their own forward.")
    qgemm = Switch(bool, True, "CPU qlinear: whether the register-blocked Gemm path may serve large M (False: "
                   "dequantize + ATen's GEMM).", native=("qgemm", "set_qgemm"))
    cuda_gemm_min_m = Switch(int, 65, "CUDA qlinear, bf16/fp16 x: smallest M that dequantizes the weight and "
                             "calls cuBLAS instead of the mma.sync kernel.", minimum=0,
                             native=("cuda_gemm_min_m", "set_cuda_gemm_min_m"))
    cuda_skinny_max_m = Switch(int, 0, "CUDA qlinear: largest M that takes the skinny split-K kernel (0: off).",
                               minimum=0, maximum=64, native=("cuda_skinny_max_m", "set_cuda_skinny_max_m"))
    cuda_skinny_segs = Switch(int, 0, "CUDA qlinear: segments per block of the skinny kernel (0: chosen per "
                              "layer and GPU).", minimum=0, maximum=8,
                              native=("cuda_skinny_segs", "set_cuda_skinny_segs"))
    cuda_int8_lt = Switch(bool, False, "CUDA int8 GEMM: cuBLASLt with its heuristic algorithm and a workspace "
                          "(True) or at::_int_mm (False).", native=("cuda_int8_lt", "set_cuda_int8_lt"))

    __slots__ = ("_values",)

    def __init__(self) -> None:
        object.__setattr__(self, "_values", {s.name: s.default for s in self.switches().values() if s.native is None})

    @classmethod
    def switches(cls) -> dict[str, Switch]:
        """Every switch by name, in declaration order."""
        return {k: v for k, v in vars(cls).items() if isinstance(v, Switch)}

    @classmethod
    def _switch(cls, name: str) -> Switch:
        switch = vars(cls).get(name)
        if not isinstance(switch, Switch):
            raise AttributeError(f"hfquant: settings has no switch {name!r} (switches: {', '.join(cls.switches())})")
        return switch

    def __getattr__(self, name: str) -> Any:  # only for names that are not switches
        self._switch(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._switch(name).__set__(self, value)

    def as_dict(self) -> dict[str, Any]:
        """Every switch's current value, in declaration order (for reports)."""
        return {name: getattr(self, name) for name in self.switches()}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every switch's default value."""
        return {name: s.default for name, s in cls.switches().items()}

    def __call__(self, **overrides: Any) -> contextlib.AbstractContextManager[Settings]:
        """A context manager that sets the given switches on entry and restores the previous
        values on exit. The values are checked here, before anything changes."""
        for name, value in overrides.items():
            self._switch(name).check(value)
        return self._overridden(overrides)

    @contextlib.contextmanager
    def _overridden(self, overrides: dict[str, Any]) -> Iterator[Settings]:
        previous: dict[str, Any] = {}
        try:
            for name, value in overrides.items():
                previous[name] = getattr(self, name)
                setattr(self, name, value)
            yield self
        finally:
            for name, value in reversed(previous.items()):
                setattr(self, name, value)

    def _seed(self, environ: Mapping[str, str]) -> None:
        """Sets the switches whose HFQUANT_<NAME> variable is set and not empty."""
        for name, switch in self.switches().items():
            text = environ.get(switch.env, "")
            if text:
                setattr(self, name, switch.from_env(text))

    def __repr__(self) -> str:
        return "hfquant.settings(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"


settings = Settings()
settings._seed(os.environ)

__all__ = ["Settings", "Switch", "settings"]
