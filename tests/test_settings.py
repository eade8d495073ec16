"""hfquant.settings: the typed kernel and backend switches (hfquant/runtime.py).

Every switch round-trips through the extension, bad values and types fail with a message
naming the switch, the value and what is allowed, the context manager restores on exit and on
an exception, HFQUANT_* variables seed the values once at load, and the switches really change
the kernel path a call takes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hfquant
import hfquant.ops
from hfquant import ref
from hfquant._ext import _C
from hfquant.runtime import Settings

S = hfquant.settings
ISAS = tuple(_C.available_isas())
INT8_PATHS = tuple(_C.available_int8_paths())
GEMV_ALLOWED = "None (chosen per kernel path, dtype and layer size) or an integer of at least 0"

# Each switch with values to set in turn (the last one restores the default).
SAMPLES = {
    "backend": ["ref", "native"],
    "isa": [*ISAS, "auto"],
    "int8_path": [*INT8_PATHS, "auto"],
    "gemv_max_m": [0, 7, None],
    "gemm_min_m": [1, 33, None],
    "block_rows": [1, 64, None],
    "int8_activations_min_m": [1, 512, None],
    "generate_cache": ["transformers", "auto"],
    "fused_ops": [False, True],
    "qgemm": [False, True],
    "cuda_gemm_min_m": [0, 1 << 30, 65],
    "cuda_skinny_max_m": [64, 16, 0],
    "cuda_skinny_segs": [8, 1, 0],
    "cuda_int8_lt": [True, False],
}
# The extension's getter of each native switch, and what it returns for a value.
NATIVE = {"isa": "cpu_isa_setting", "int8_path": "int8_path_setting", "gemv_max_m": "gemv_max_m",
          "gemm_min_m": "gemm_min_m", "block_rows": "block_rows", "qgemm": "qgemm",
          "cuda_gemm_min_m": "cuda_gemm_min_m", "cuda_skinny_max_m": "cuda_skinny_max_m",
          "cuda_skinny_segs": "cuda_skinny_segs", "cuda_int8_lt": "cuda_int8_lt"}


@pytest.fixture(autouse=True)
def _restore_settings():
    """Every test leaves the switches as it found them (they are process-wide)."""
    before = S.as_dict()
    yield
    for name, value in before.items():
        setattr(S, name, value)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFQUANT_")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def test_switch_list_and_defaults():
    assert list(Settings.switches()) == list(SAMPLES)
    assert Settings.defaults() == {"backend": "native", "isa": "auto", "int8_path": "auto", "gemv_max_m": None,
                                   "gemm_min_m": None, "block_rows": None, "int8_activations_min_m": 16, "generate_cache": "auto",
                                   "fused_ops": True, "qgemm": True, "cuda_gemm_min_m": 65,
                                   "cuda_skinny_max_m": 0, "cuda_skinny_segs": 0, "cuda_int8_lt": False}
    for name, switch in Settings.switches().items():
        assert switch.env == "HFQUANT_" + name.upper()
        assert switch.doc and "\n" not in switch.doc, name
    assert list(S.as_dict()) == list(SAMPLES)
    assert hfquant.settings is hfquant.runtime.settings
    assert "settings" in hfquant.__all__


@pytest.mark.parametrize("name", list(SAMPLES))
def test_every_switch_round_trips(name):
    for value in SAMPLES[name]:
        setattr(S, name, value)
        assert getattr(S, name) == value and type(getattr(S, name)) is type(value), (name, value)
        assert S.as_dict()[name] == value
        if name in NATIVE:  # the value lives in the extension (None is -1 there)
            assert getattr(_C, NATIVE[name])() == (-1 if value is None else value), (name, value)


def test_isa_and_int8_path_take_effect():
    for isa in ISAS:
        S.isa = isa
        assert _C.cpu_isa() == isa
    S.isa = "auto"
    assert _C.cpu_isa() == ISAS[0]  # the best this CPU runs
    S.int8_path = INT8_PATHS[-1]
    assert _C.int8_path() == INT8_PATHS[-1]


BAD = [
    ("backend", "fast", "'native', 'ref'"),
    ("backend", None, "'native', 'ref'"),
    ("backend", 1, "'native', 'ref'"),
    ("isa", "avx9", ", ".join(map(repr, ("auto", *ISAS)))),
    ("isa", "AVX2", ", ".join(map(repr, ("auto", *ISAS)))),
    ("int8_path", "sse9", ", ".join(map(repr, ("auto", *INT8_PATHS)))),
    ("gemv_max_m", -1, GEMV_ALLOWED),
    ("gemv_max_m", 2.0, GEMV_ALLOWED),
    ("gemv_max_m", "3", GEMV_ALLOWED),
    ("gemv_max_m", True, GEMV_ALLOWED),
    ("gemm_min_m", 0, "None (chosen per kernel path and bits) or an integer of at least 1"),
    ("block_rows", -4, "None (about 16 MiB of rows) or an integer of at least 1"),
    ("qgemm", 1, "True or False"),
    ("qgemm", "false", "True or False"),
    ("cuda_gemm_min_m", None, "an integer of at least 0"),
    ("cuda_gemm_min_m", -1, "an integer of at least 0"),
    ("cuda_skinny_max_m", 65, "an integer from 0 to 64"),
    ("cuda_skinny_segs", 9, "an integer from 0 to 8"),
    ("cuda_int8_lt", None, "True or False"),
]


@pytest.mark.parametrize("name,value,allowed", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_bad_values_and_types_fail_with_the_message(name, value, allowed):
    before = S.as_dict()
    message = f"hfquant: settings.{name}={value!r} is not allowed (allowed: {allowed})"
    with pytest.raises(ValueError) as err:
        setattr(S, name, value)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        S(**{name: value})
    assert str(err.value) == message
    assert S.as_dict() == before


def test_unknown_switch():
    names = ", ".join(SAMPLES)
    for action in (lambda: setattr(S, "gemv_max", 1), lambda: S.gemv_max, lambda: S(gemv_max=1)):
        with pytest.raises(AttributeError) as err:
            action()
        assert str(err.value) == f"hfquant: settings has no switch 'gemv_max' (switches: {names})"


@pytest.mark.parametrize("setter,value,message", [
    ("set_gemv_max_m", -2, "hfquant: gemv_max_m=-2 is not allowed (-1 for the default, or at least 0)"),
    ("set_gemm_min_m", 0, "hfquant: gemm_min_m=0 is not allowed (-1 for the default, or at least 1)"),
    ("set_block_rows", 0, "hfquant: block_rows=0 is not allowed (-1 for the default, or at least 1)"),
    ("set_cuda_gemm_min_m", -1, "hfquant: cuda_gemm_min_m=-1 is not allowed (at least 0)"),
    ("set_cuda_skinny_max_m", 65, "hfquant: cuda_skinny_max_m=65 is not allowed (0..64; 0 turns it off)"),
    ("set_cuda_skinny_segs", -1, "hfquant: cuda_skinny_segs=-1 is not allowed (0..8; 0 chooses per layer)"),
    ("set_cpu_isa", "avx9", "hfquant: unknown CPU kernel path 'avx9' (expected one of auto, avx512bf16, avx512, "
                            "avx2, portable)"),
])
def test_native_setters_check_their_argument(setter, value, message):
    before = S.as_dict()
    with pytest.raises(RuntimeError) as err:
        getattr(_C, setter)(value)
    assert str(err.value) == message
    assert S.as_dict() == before


def test_context_manager_restores_on_exit_and_on_exception():
    before = S.as_dict()
    with S(backend="ref", gemv_max_m=0, qgemm=False) as inner:
        assert inner is S
        assert (S.backend, S.gemv_max_m, S.qgemm) == ("ref", 0, False)
        assert _C.gemv_max_m() == 0 and _C.qgemm() is False
        with S(gemv_max_m=5):  # nested: restores the outer override
            assert S.gemv_max_m == 5
        assert S.gemv_max_m == 0
    assert S.as_dict() == before

    with pytest.raises(KeyError, match="inside"):
        with S(isa=ISAS[-1], cuda_int8_lt=True, block_rows=8):
            assert (S.isa, S.cuda_int8_lt, S.block_rows) == (ISAS[-1], True, 8)
            raise KeyError("inside")
    assert S.as_dict() == before


def test_context_manager_checks_every_value_before_changing_any():
    before = S.as_dict()
    with pytest.raises(ValueError, match=r"settings.cuda_skinny_segs=9 is not allowed"):
        with S(backend="ref", cuda_skinny_segs=9):
            pytest.fail("entered with a bad value")
    assert S.as_dict() == before


_PRINT_SETTINGS = "import json, os, hfquant; print(json.dumps(hfquant.settings.as_dict()))"


def test_environment_seeds_the_values_once():
    env = _clean_env(HFQUANT_BACKEND="ref", HFQUANT_ISA="portable", HFQUANT_GEMV_MAX_M="0", HFQUANT_QGEMM="false",
                     HFQUANT_BLOCK_ROWS=" 12 ", HFQUANT_CUDA_INT8_LT="1", HFQUANT_CUDA_SKINNY_MAX_M="16",
                     HFQUANT_GEMM_MIN_M="")  # empty: unset
    code = ("import json, os, hfquant\n"
            "first = hfquant.settings.as_dict()\n"
            "os.environ['HFQUANT_BACKEND'] = 'native'; os.environ['HFQUANT_GEMV_MAX_M'] = '9'\n"
            "print(json.dumps([first, hfquant.settings.as_dict(), hfquant._ext._C.cpu_isa()]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first, later, active = json.loads(out.stdout.strip().splitlines()[-1])
    want = dict(Settings.defaults(), backend="ref", isa="portable", gemv_max_m=0, qgemm=False, block_rows=12,
                cuda_int8_lt=True, cuda_skinny_max_m=16)
    assert first == want
    assert later == want  # read once: later changes to the environment have no effect
    assert active == "portable"


def test_defaults_without_environment():
    out = subprocess.run([sys.executable, "-c", _PRINT_SETTINGS], env=_clean_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == Settings.defaults()


@pytest.mark.parametrize("var,text,allowed", [
    ("HFQUANT_GEMV_MAX_M", "abc", "an integer of at least 0"),
    ("HFQUANT_ISA", "avx9", ", ".join(("auto", *ISAS))),
    ("HFQUANT_QGEMM", "maybe", "1, 0, true or false"),
], ids=["gemv_max_m", "isa", "qgemm"])
def test_bad_environment_value_fails_naming_the_variable(var, text, allowed):
    out = subprocess.run([sys.executable, "-c", _PRINT_SETTINGS], env=_clean_env(**{var: text}),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"ValueError: hfquant: environment variable {var}={text!r} is not valid (allowed: {allowed})")


def _qlinear_case(gen, M=16, N=64, K=512, bits=4, gs=128):
    qw = torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8)
    sc = torch.rand(N, K // gs, generator=gen) * 0.02 + 0.001
    x = torch.randn(M, K, generator=gen)
    w, sb = torch.ops.hfquant.repack(qw, sc, None, bits, gs, K)
    return x, w, sb, bits, gs, N, K


def test_gemv_max_m_and_qgemm_change_the_path_taken():
    """Each forced path agrees with the twin in hfquant/ref.py; the GEMV kernel and the blocked
    path (dequantize + ATen's GEMM) sum in different orders, so their outputs differ in the last
    bits: the switch really changed the kernel."""
    x, w, sb, bits, gs, N, K = _qlinear_case(torch.Generator().manual_seed(3))
    want = ref.qlinear_ref(x.double(), w, sb, None, bits, gs, N, K)
    outs = {}
    for label, overrides in {"gemv": dict(gemv_max_m=1000), "gemm": dict(gemv_max_m=0, qgemm=True),
                             "blocked": dict(gemv_max_m=0, qgemm=False)}.items():
        with S(**overrides):
            outs[label] = hfquant.ops.qlinear(x, w, sb, None, bits, gs, N, K)
        err = (outs[label].double() - want).abs().max().item()
        assert err <= 1e-4 * want.abs().max().item(), (label, err)
    assert not torch.equal(outs["gemv"], outs["blocked"])


def test_backend_switch_routes_to_the_twins():
    x, w, sb, bits, gs, N, K = _qlinear_case(torch.Generator().manual_seed(4), M=3)
    twin = ref.qlinear_ref(x, w, sb, None, bits, gs, N, K)
    native = hfquant.ops.qlinear(x, w, sb, None, bits, gs, N, K)
    with S(backend="ref"):
        assert torch.equal(hfquant.ops.qlinear(x, w, sb, None, bits, gs, N, K), twin)
    assert torch.equal(hfquant.ops.qlinear(x, w, sb, None, bits, gs, N, K), native)
    assert not torch.equal(native, twin)  # the native kernel sums in another order


def test_docs_describe_every_switch():
    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name, switch in Settings.switches().items():
        assert f"`{name}`" in text and f"`{switch.env}`" in text, name
