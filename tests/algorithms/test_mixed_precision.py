"""Mixed precision: the bit allocator, sensitivities, and method="mixed" end to end."""
import itertools
import json
import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hfquant
from hfquant.algorithms.mixed import Option, allocate, bits_per_layer, stored_bits
from hfquant.nn import QuantEmbedding, QuantLinear, TiedQuantLinear


def _brute(options, budget):
    names = list(options)
    best = None
    for combo in itertools.product(*(options[n] for n in names)):
        cost = sum(o.cost for o in combo)
        err = sum(o.error for o in combo)
        if cost <= budget and (best is None or err < best[0]):
            best = (err, {n: o.bits for n, o in zip(names, combo)})
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocate_respects_budget_and_is_near_optimal(seed):
    rnd = random.Random(seed)
    options = {}
    for i in range(6):
        n = rnd.choice([100, 400, 1600])
        base = rnd.uniform(0.1, 10) * n
        options[f"l{i}"] = [Option(b, base * 2.0 ** (-2 * b) * rnd.uniform(0.5, 2), n * b + 32) for b in (2, 3, 4, 8)]
    total = sum(o[0].cost - 32 for o in options.values()) / 2  # weights
    budget = 4.5 * total
    chosen = allocate(options, budget)
    cost = sum(next(o.cost for o in options[n] if o.bits == b) for n, b in chosen.items())
    err = sum(next(o.error for o in options[n] if o.bits == b) for n, b in chosen.items())
    assert cost <= budget
    opt_err, _ = _brute(options, budget)
    assert err <= 1.01 * opt_err + 1e-12  # the DP over 8192 budget steps: the exact optimum up to rounding


def test_allocate_impossible_budget():
    options = {"a": [Option(2, 1.0, 300), Option(4, 0.1, 500)]}
    with pytest.raises(ValueError, match="cheapest assignment needs 300 bits"):
        allocate(options, 299)
    assert allocate(options, 10_000) == {"a": 4}


def test_stored_bits_counts_codes_scales_zeros():
    assert stored_bits(10, 256, 4, 128, True, 32) == 10 * 256 * 4 + 10 * 2 * 32
    assert stored_bits(10, 256, 3, 128, False, 16) == 10 * 256 * 3 + 10 * 2 * (16 + 8)
    assert stored_bits(10, 300, 8, -1, True, 16) == 10 * 300 * 8 + 10 * 16


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # uneven layers, so the allocation has something to choose
        m.model.layers[1].mlp.down_proj.weight.mul_(8)
    return m


def _avg_stored_bits(model, scale_bits=32):
    total = bits = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            total += m.in_features * m.out_features
            bits += stored_bits(m.out_features, m.in_features, m.bits, m.group_size, m.symmetric, scale_bits)
    return bits / total


def test_mixed_variance_on_tiny_model(tmp_path):
    model = _tiny_llama()
    cfg = hfquant.HfQuantConfig(method="mixed", target_bits=4.0, group_size=32, symmetric=False,
                                sensitivity="variance", modules_override={"layers.0.self_attn.q_proj": {"bits": 8}})
    hfquant.quantize_model(model, cfg)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, TiedQuantLinear)
    chosen = {n: b for n, b, _ in bits_per_layer(model)}
    assert chosen["model.layers.0.self_attn.q_proj"] == 8  # a user override stays fixed
    assert len(set(chosen.values())) > 1
    # the scaled-up down_proj has the largest variance: it gets at least the bits of its twin
    assert chosen["model.layers.1.mlp.down_proj"] >= chosen["model.layers.0.mlp.down_proj"]
    assert _avg_stored_bits(model) <= 4.0 + 1e-9
    assert all(n in cfg.modules_override or n.endswith("q_proj") for n in chosen)
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        logits = model(x).logits
    model.save_pretrained(tmp_path)
    saved = json.load(open(os.path.join(tmp_path, "config.json")))["quantization_config"]
    assert saved["method"] == "mixed" and saved["target_bits"] == 4.0
    again = AutoModelForCausalLM.from_pretrained(tmp_path)  # no calibration on reload
    assert {n: b for n, b, _ in bits_per_layer(again)} == chosen
    with torch.no_grad():
        assert torch.equal(again(x).logits, logits)


def test_mixed_impossible_budget_fails_before_touching_weights():
    model = _tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # 2-bit codes + fp32 scale and zero per group of 32 = 3.25 bits at least
    cfg = hfquant.HfQuantConfig(method="mixed", target_bits=2.5, group_size=32, symmetric=False,
                                sensitivity="variance")
    with pytest.raises(ValueError, match=r"target_bits=2\.5 cannot be met with bits \[2, 3, 4, 8\] at group_size=32"):
        hfquant.quantize_model(model, cfg)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_bits=1.5), "target_bits=1.5 is impossible"),
    (dict(target_bits=float("nan")), "target_bits=nan"),
    (dict(mixed_bits=[4, 5]), "mixed_bits"),
    (dict(mixed_bits=[]), "mixed_bits"),
    (dict(sensitivity="magic"), "sensitivity='magic'"),
    (dict(mixed_base="awq"), "mixed_base='awq'"),
    (dict(calibration={"n_samples": 0}), "n_samples"),
])
def test_mixed_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hfquant.HfQuantConfig(method="mixed", **kwargs)


def test_mixed_fisher_real_model(model_dir, tokenizer, wikitext, tmp_path):
    """Fisher sensitivity on the default model (2 of its layers, 2 calibration windows)."""
    text = tmp_path / "calib.txt"
    text.write_text(wikitext[:20000])
    cfg = hfquant.HfQuantConfig(method="mixed", target_bits=5.0, group_size=128, symmetric=False,
                                calibration={"text": str(text), "n_samples": 2, "seq_len": 128})
    from hfquant.algorithms import mixed

    seen = {}
    orig = mixed.allocate_bits

    def spy(*a, **k):
        seen["report"] = orig(*a, **k)
        return seen["report"]

    mixed.allocate_bits = spy
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, num_hidden_layers=2)
    finally:
        mixed.allocate_bits = orig
    report = seen["report"]
    for name, r in report.items():
        errs = [r["errors"][b] for b in (2, 3, 4, 8)]
        assert all(e > 0 for e in errs), name
        assert errs[0] > errs[1] > errs[2] > errs[3], name  # fewer bits, larger estimated loss change
    assert isinstance(model.lm_head, TiedQuantLinear)
    # the table counts twice (lookup + tied lm_head): it is the most sensitive tensor per weight
    per_weight = {n: r["errors"][4] / r["numel"] for n, r in report.items()}
    assert report["model.embed_tokens"]["bits"] >= 4
    assert max(per_weight.values()) > 10 * min(per_weight.values())
    x = tokenizer("The quick brown fox", return_tensors="pt")
    model.save_pretrained(tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again(**x).logits, model(**x).logits)


def test_mixed_cli_and_bits_plot(tmp_path, capsys):
    from hfquant.cli import main

    src = tmp_path / "tiny"
    _tiny_llama().save_pretrained(src)
    out = tmp_path / "out"
    png = tmp_path / "bits.png"
    rc = main(["quantize", str(src), str(out), "--method", "mixed", "--sensitivity", "variance", "--target-bits", "4",
               "--group-size", "32", "--asymmetric", "--plot-bits", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "method: mixed" in text and "target_bits: 4.0" in text and "bits_per_layer:" in text
    assert "quantize_embeddings: True" in text
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    again = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(again.lm_head, TiedQuantLinear)
    assert main(["quantize", str(src), str(tmp_path / "x"), "--target-bits", "4"]) == 2
    assert "--target-bits, --mixed-bits, --sensitivity and --mixed-base apply to --method mixed" in \
        capsys.readouterr().err
    assert not (tmp_path / "x").exists()
