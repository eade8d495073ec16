"""Bad input to `hfquant compare` / `hfquant eval`: a clear message naming the problem; what
can still be measured is measured."""
import json
import os

import pytest

from hfquant.cli import main
from hfquant.evaluate import compare as compare_mod

SHORT_TEXT = "The tower is 324 metres tall, about the same height as an 81-storey building. " * 3
TINY = ["--max-tokens", "1024", "--new-tokens", "4", "--prompt-tokens", "32", "--repeats", "1", "--threads", "2"]


@pytest.fixture(scope="module")
def short_run(model_dir, tmp_path_factory):
    """fp32 on a text shorter than one window, with a peer whose library is missing."""
    d = tmp_path_factory.mktemp("short")
    text = d / "short.txt"
    text.write_text(SHORT_TEXT, encoding="utf-8")
    out = d / "report"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(compare_mod.PEER_MODULES, "hqq", "hfquant_no_such_peer_module")
        rc = main(["compare", model_dir, "--configs", "fp32", "--peers", "hqq", "--text", str(text),
                   "--out", str(out)] + TINY)
    return rc, out


def test_text_shorter_than_one_window_leaves_perplexity_na_and_measures_the_rest(short_run, capsys):
    rc, out = short_run
    assert rc == 0
    doc = json.load(open(out / "results.json"))
    fp32 = next(r for r in doc["results"] if r["config"] == "fp32")
    assert fp32["ok"] and fp32["perplexity"] is None
    assert "fewer than one window of 512" in fp32["perplexity_na"]
    assert fp32["prefill_tokens_per_s"] > 0 and fp32["decode_tokens_per_s"]["1"] > 0
    assert fp32["size_on_disk_bytes"] > 0
    assert any("fewer than one window" in w for w in doc["warnings"])
    md = open(out / "report.md").read()
    assert "Perplexity n/a" in md and "fewer than one window" in md


def test_missing_peer_is_reported_and_the_rest_runs(short_run):
    rc, out = short_run
    doc = json.load(open(out / "results.json"))
    res = {r["config"]: r for r in doc["results"]}
    assert res["fp32"]["ok"]
    hqq = res["hqq-int4g64"]
    assert not hqq["ok"] and "not installed" in hqq["error"] and "pip install hqq" in hqq["error"]
    assert "hqq-int4g64: peer hqq" in open(out / "report.md").read()


def test_missing_text_file_is_named_before_anything_runs(model_dir, tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    rc = main(["compare", model_dir, "--configs", "fp32", "--text", str(missing), "--out", str(tmp_path / "r")])
    assert rc == 2
    assert f"text file {missing} not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["eval", model_dir, "--text", str(missing)]) == 2
    assert "not found" in capsys.readouterr().err


def test_eval_refuses_a_text_shorter_than_one_window(model_dir, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text(SHORT_TEXT, encoding="utf-8")
    assert main(["eval", model_dir, "--text", str(text)]) == 2
    assert "fewer than one window of 512" in capsys.readouterr().err


def test_model_dir_that_is_not_a_causal_lm(tmp_path, capsys):
    from transformers import ViTConfig

    vit = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(vit)
    for cmd in ("compare", "eval"):
        rc = main([cmd, str(vit), "--out", str(tmp_path / "r")] if cmd == "compare" else [cmd, str(vit)])
        assert rc == 2
        err = capsys.readouterr().err
        assert "is not a causal language model" in err and "'vit'" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "absent"), "--out", str(tmp_path / "r")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_unknown_peer_is_named(model_dir, tmp_path, capsys):
    assert main(["compare", model_dir, "--peers", "gguf", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "gguf" in err and "bnb" in err and "hqq" in err


def test_single_peer_configs_can_be_named_and_missing_ones_are_skipped(monkeypatch):
    run, skipped = compare_mod.parse_configs("fp32,torchao-int4g64", "bnb")
    assert run[0] == "fp32" and set(run + list(skipped)) == {"fp32", "torchao-int4g64", "bnb-int8", "bnb-nf4"}
    monkeypatch.setitem(compare_mod.PEER_MODULES, "bnb", "hfquant_no_such_peer_module")
    run, skipped = compare_mod.parse_configs("fp32,bnb-nf4", None)
    assert run == ["fp32"] and "pip install bitsandbytes" in skipped["bnb-nf4"]
