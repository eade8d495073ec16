"""The method registry (hfquant/methods/): names, settings routed to the method's class,
errors naming the methods a setting belongs to, a method registered from outside the package
working end to end, and no `method ==` string tests left in the layers above the methods."""
from __future__ import annotations

import ast
import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from _utils import save_tiny_llama

import hfquant
from hfquant import HfQuantConfig
from hfquant.methods import get_method, layer_tensor_keys, method_names, methods_taking, register_method
from hfquant.methods import base as methods_base
from hfquant.methods.rtn import Rtn
from hfquant.nn import QuantLinear

BUILTIN = ("rtn", "gptq", "awq", "llm_int8", "w8a8", "kmeans", "mixed")


def test_builtin_methods_in_order():
    assert method_names()[:len(BUILTIN)] == BUILTIN
    assert "rtn_mse" in method_names()


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match=r"method='awq2' is not supported \(use one of \('rtn', 'gptq'"):
        HfQuantConfig(method="awq2")


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="rtn", damp=0.1), "HfQuantConfig: damp applies to methods ('gptq', 'mixed'), not 'rtn'"),
    (dict(method="awq", act_order=False), "HfQuantConfig: act_order applies to methods ('gptq', 'mixed'), not 'awq'"),
    (dict(method="rtn", smoothquant_alpha=0.5),
     "HfQuantConfig: smoothquant_alpha applies to methods ('llm_int8', 'w8a8'), not 'rtn'"),
    (dict(method="kmeans", calibration={}), "HfQuantConfig: calibration applies to methods"),
    (dict(method="rtn", nonsense=1), "HfQuantConfig: unknown argument(s) ['nonsense']"),
    (dict(method="gptq", damp="x"), "HfQuantConfig: damp must be a number, got 'x' (str)"),
    (dict(method="gptq", damp=0), "HfQuantConfig: damp=0 must be a number in (0, 1]"),
    (dict(method="rtn_mse", max_shrink=1.0), "HfQuantConfig: max_shrink=1.0 must be below 1"),
    (dict(method="rtn_mse", clip_steps=0), "HfQuantConfig: clip_steps=0 must be an integer >= 1"),
    (dict(method="w8a8", modules_override={"x": {"bits": 4}}),
     "HfQuantConfig: modules_override is not supported with method='w8a8'"),
])
def test_setting_errors(kwargs, message):
    with pytest.raises(ValueError) as e:
        HfQuantConfig(**kwargs)
    assert str(e.value).startswith(message)


def test_settings_read_and_write_as_config_attributes():
    cfg = HfQuantConfig(method="gptq", damp=0.02)
    assert cfg.damp == 0.02 and cfg.settings.damp == 0.02 and cfg.act_order is True
    cfg.damp = 0.05  # writes the method's settings
    assert cfg.settings.damp == 0.05 and cfg.to_dict()["damp"] == 0.05
    with pytest.raises(AttributeError, match="HfQuantConfig: method 'gptq' has no setting 'kmeans_init'"):
        cfg.kmeans_init
    rtn = HfQuantConfig()
    assert not hasattr(rtn, "damp")
    assert dataclasses.asdict(rtn.settings) == {"grid": "best", "zero_point": "integer"}


def test_deepcopy_is_independent():
    cfg = HfQuantConfig(method="llm_int8", smooth_modules=["a"])
    dup = copy.deepcopy(cfg)
    dup.smooth_modules.append("b")
    assert cfg.smooth_modules == ["a"] and dup.smooth_modules == ["a", "b"]
    assert dup.impl.config is dup and cfg.impl.config is cfg


def test_methods_taking_and_tensor_keys():
    assert methods_taking("clip_search") == ["gptq", "awq", "mixed"]
    assert methods_taking("nothing") == []
    assert set(layer_tensor_keys()) == {"qweight", "scales", "zeros", "offsets", "perm", "smooth", "codebook"}


def test_method_facts_drive_the_quantizer():
    from hfquant.quantizer import HfQuantQuantizer

    expected = {"rtn": True, "gptq": True, "llm_int8": False, "w8a8": False, "kmeans": False, "mixed": True}
    for name, trainable in expected.items():
        assert HfQuantQuantizer(HfQuantConfig(method=name)).is_trainable is trainable, name


def test_register_refuses_a_taken_name_and_a_non_dataclass():
    class Clash(Rtn):
        name = "rtn"

    with pytest.raises(ValueError, match="a method named 'rtn' is registered already"):
        register_method(Clash)

    class NoDataclass(Rtn):
        name = "no_dataclass"
        Settings = dict

    with pytest.raises(ValueError, match="NoDataclass.Settings must be a dataclass"):
        register_method(NoDataclass)


@dataclasses.dataclass
class HalfSettings:
    shrink: float = 0.5


class HalfRange(Rtn):
    """A method from outside the package: round to nearest with every range halved."""

    name = "test_half_range"
    Settings = HalfSettings
    SETTING_TYPES = {"shrink": "number"}

    def quantize_weight(self, name, module, weight):
        from hfquant import formats

        q = formats.quantize_rtn(weight, module.bits, module.group_size, module.symmetric,
                                 scale_dtype=module.scales.dtype, clip=self.settings.shrink)
        return {"qweight": q.qweight, "scales": q.scales}


@pytest.fixture
def half_range(monkeypatch):
    monkeypatch.setattr(methods_base, "_METHODS", dict(methods_base._METHODS))
    register_method(HalfRange)
    return HalfRange


def _tiny(tmp_path):
    return save_tiny_llama(tmp_path / "src")


def test_a_registered_method_loads_saves_and_reloads(half_range, tmp_path):
    from transformers import AutoModelForCausalLM

    src = _tiny(tmp_path)
    cfg = HfQuantConfig(method="test_half_range", bits=4, group_size=32, shrink=0.25)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear)
    # the method's own quantize_weight ran: the scales are those of the shrunk range
    w = AutoModelForCausalLM.from_pretrained(src).model.layers[0].mlp.down_proj.weight.detach()
    from hfquant import formats

    want = formats.quantize_rtn(w, 4, 32, True, clip=0.25)
    assert torch.equal(layer.scales, want.scales)
    ids = torch.tensor([[1, 5, 9, 33]])
    out = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    saved = (tmp_path / "q" / "config.json").read_text()
    assert '"method": "test_half_range"' in saved and '"shrink": 0.25' in saved
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.quantization_config.shrink == 0.25
    assert torch.equal(again(ids).logits, out)


def test_rtn_mse_lowers_the_weight_error_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    src = _tiny(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=HfQuantConfig(method="rtn_mse",
                                                                                       group_size=32))
    # rtn_mse searches a clip of the range grid: it lowers that grid's error
    rtn = AutoModelForCausalLM.from_pretrained(src, quantization_config=HfQuantConfig(group_size=32, grid="range"))
    ref = AutoModelForCausalLM.from_pretrained(src)
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        w = ref.model.layers[1].get_submodule(name).weight.detach()
        err = {}
        for tag, m in (("mse", model), ("rtn", rtn)):
            layer = m.model.layers[1].get_submodule(name)
            err[tag] = (layer.dequantize_weight(torch.float32) - w).pow(2).sum().item()
        assert err["mse"] < err["rtn"], (name, err)
    # quantized in memory (quantize_model) and on load give the same tensors
    mem = hfquant.quantize_model(AutoModelForCausalLM.from_pretrained(src), HfQuantConfig(method="rtn_mse",
                                                                                          group_size=32))
    a, b = mem.model.layers[0].mlp.up_proj, model.model.layers[0].mlp.up_proj
    assert torch.equal(a.scales, b.scales) and torch.equal(a.dequantize_weight(), b.dequantize_weight())
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(again(ids).logits, model(ids).logits)
    assert again.config.quantization_config.short_name == "mse-w4g32"
    with pytest.raises(ValueError, match="not trainable by QAT"):
        hfquant.prepare_qat(AutoModelForCausalLM.from_pretrained(src), HfQuantConfig(method="rtn_mse"))


# The layers above the methods decide nothing by a method's name.
NO_METHOD_TESTS = ["config.py", "quantizer.py", "replace.py", "cli.py", "evaluate", "interop"]


def _method_name_tests(path: Path) -> list[str]:
    names = set(method_names())
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        if not any("method" in ast.unparse(s) for s in sides):
            continue
        for s in sides:
            consts = [s] if isinstance(s, ast.Constant) else list(getattr(s, "elts", []))
            if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
                break
    return found


def test_no_method_name_tests_outside_the_methods():
    root = Path(hfquant.__file__).parent
    files = [p for entry in NO_METHOD_TESTS for p in ([root / entry] if entry.endswith(".py")
                                                       else sorted((root / entry).rglob("*.py")))]
    assert len(files) > 6
    found = [f for p in files for f in _method_name_tests(p)]
    assert not found, "tests of a method's name outside hfquant/methods:\n" + "\n".join(found)


def test_the_method_name_check_can_fail(tmp_path):
    p = tmp_path / "x.py"
    p.write_text('if config.method == "kmeans":\n    pass\nif args.method in ("gptq", "awq"):\n    pass\n'
                 'if q.get("quant_method") != "hfquant":\n    pass\n')
    assert _method_name_tests(p) == ['x.py:1: config.method == \'kmeans\'',
                                     "x.py:3: args.method in ('gptq', 'awq')"]


def test_get_method_returns_the_class():
    assert get_method("kmeans").layer_class.__name__ == "LutLinear"
    assert isinstance(HfQuantConfig(method="kmeans").impl, get_method("kmeans"))
