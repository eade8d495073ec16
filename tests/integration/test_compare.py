"""`hfquant compare` end to end on the default model, with a tiny budget (each config in its own process)."""
import json
import math
import os

import pytest

from hfquant.cli import main

PLOTS = ("ppl_vs_size.png", "decode_speed.png", "peak_memory.png")


@pytest.fixture(scope="module")
def report(model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("compare"))
    rc = main(["compare", model_dir, "--configs", "fp32,w8,kv4", "--max-tokens", "1024", "--new-tokens", "8",
               "--prompt-tokens", "64", "--repeats", "1", "--threads", "2", "--out", out])
    assert rc == 0
    return out


def test_compare_writes_report_json_and_plots(report):
    for name in ("report.md", "results.json") + PLOTS:
        path = os.path.join(report, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, name
    doc = json.load(open(os.path.join(report, "results.json")))
    res = {r["config"]: r for r in doc["results"]}
    assert set(res) == {"fp32", "w8", "kv4"} and all(r["ok"] for r in res.values()), res
    fp32, w8, kv4 = res["fp32"], res["w8"], res["kv4"]
    assert math.isfinite(fp32["perplexity"]) and math.isfinite(w8["perplexity"])
    assert abs(w8["perplexity"] / fp32["perplexity"] - 1) < 0.02
    assert 0 < w8["size_on_disk_bytes"] < fp32["size_on_disk_bytes"]
    # kv4: fp32 weights, perplexity read through the 4-bit cache: moved, but only slightly
    assert "QuantizedKVCache" in kv4["perplexity_method"]
    assert kv4["perplexity"] != fp32["perplexity"] and abs(kv4["perplexity"] / fp32["perplexity"] - 1) < 0.02
    for r in (fp32, w8, kv4):
        assert r["threads"] == 2 and r["perplexity_tokens"] == 1024
        assert r["energy"]["method"] in ("rapl", "estimate") and r["energy"]["joules_per_token"] > 0
        assert r["peak_rss_load_bytes"] > 0 and r["peak_rss_inference_bytes"] > 0
        # the one-token forward after loading makes the mmap'd fp32 weights count in the load peak
        assert r["peak_rss_load_bytes"] - r["rss_after_imports_bytes"] > (0.8 * r["memory_bytes"]
                                                                          if r["kind"] != "hfquant" else 0)
        assert r["rss_at_inference_start_bytes"] <= r["peak_rss_inference_bytes"]
        assert r["prefill_tokens_per_s"] > 0 and set(r["decode_tokens_per_s"]) == {"1", "8"}
        # a 135M model on 2 cores decodes tens to a few hundred tokens/s, never millions
        assert all(0 < v < 5000 for v in r["decode_tokens_per_s"].values()), r["decode_tokens_per_s"]
    md = open(os.path.join(report, "report.md")).read()
    assert "## Perplexity" in md and "| w8 |" in md and "vs fp32" in md and "method" in md


def test_compare_unknown_config_fails_naming_it(model_dir, tmp_path, capsys):
    rc = main(["compare", model_dir, "--configs", "fp32,w3g7", "--out", str(tmp_path / "r")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "w3g7" in err and "w4g128" in err  # names the bad one and lists the valid ones
    assert not os.path.exists(tmp_path / "r")
