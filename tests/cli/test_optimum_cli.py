"""`optimum-cli hfquant ...`: found by optimum's discovery of the optimum.commands.register
namespace, and running hfquant's commands."""
import json
import os
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

pytest.importorskip("optimum.commands.optimum_cli")


def _optimum_cli(*args):
    return subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_optimum_cli_lists_hfquant():
    r = _optimum_cli("hfquant", "--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("quantize", "export", "convert"):
        assert cmd in r.stdout


def test_optimum_cli_quantize_then_export(model_dir, tokenizer, tmp_path):
    # the default model's first decoder block, saved as a float checkpoint
    src = str(tmp_path / "float")
    AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=1).save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = str(tmp_path / "w8")
    r = _optimum_cli("hfquant", "quantize", src, out, "--bits", "8", "--group-size", "-1")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert cfg["quant_method"] == "hfquant" and cfg["bits"] == 8 and cfg["group_size"] == -1
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    r = _optimum_cli("hfquant", "export", out, str(tmp_path / "gptq"), "--format", "gptq")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(tmp_path / "gptq" / "config.json"))["quantization_config"]["quant_method"] == "gptq"
    # errors keep hfquant's message and exit code
    r = _optimum_cli("hfquant", "convert", src, str(tmp_path / "x"))
    assert r.returncode == 2 and "no quantization_config" in r.stderr
