"""Weight clustering (method "kmeans") through transformers on the real default model:
quantize on load, save, reload without a config, generate and pipeline, checkpoint layout,
malformed checkpoints; the CLI and a tied lm_head on a tiny model."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, pipeline

import hfquant
from hfquant.nn import LutLinear

# To keep the test short, only the first two and the last two decoder layers are clustered
# (28 of the 210 linear layers; the others stay float32), with Lloyd capped at 30 iterations.
# The accuracy benchmark (benchmarks/accuracy_kmeans.py) clusters the whole model.
CLUSTERED = (0, 1, 28, 29)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")
SKIP = ["lm_head"] + [f"model.layers.{i}.{p}" for i in range(30) if i not in CLUSTERED for p in PROJ]
CONFIG = dict(method="kmeans", bits=4, kmeans_max_iter=30, modules_to_not_convert=SKIP)


@pytest.fixture(scope="module")
def km_saved(model_dir, tokenizer, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("km") / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=hfquant.HfQuantConfig(**CONFIG))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, out


def test_save_reload_identical_generate_and_pipeline(km_saved, tokenizer):
    model, out = km_saved
    assert sum(isinstance(m, LutLinear) for m in model.modules()) == 28
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert (cfg["method"], cfg["bits"], cfg["group_size"], cfg["format_version"]) == ("kmeans", 4, -1, 1)
    again = AutoModelForCausalLM.from_pretrained(out)  # no config passed
    layer = again.model.layers[28].mlp.down_proj
    assert isinstance(layer, LutLinear) and layer.bits == 4
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, again(**ids).logits)
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    text = pipeline("text-generation", model=again, tokenizer=tokenizer)(
        "The capital of France is", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert "Paris" in text


def test_checkpoint_tensors_follow_the_kmeans_format(km_saved):
    _, out = km_saved
    sd = load_file(os.path.join(out, "model.safetensors"))
    q = sd["model.layers.0.mlp.down_proj.qweight"]
    assert q.dtype == torch.uint8 and q.shape == (576, 1536 // 2)
    cb = sd["model.layers.0.mlp.down_proj.codebook"]
    assert cb.dtype == torch.float32 and cb.shape == (576, 1, 16)
    assert torch.all(cb[..., 1:] >= cb[..., :-1])
    assert not any(k.endswith(".scales") for k in sd)


def _edit(src, dst, fn):
    shutil.copytree(src, dst)
    f = os.path.join(dst, "model.safetensors")
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("name,fn,match", [
    ("nan_codebook", lambda sd: sd["model.layers.29.mlp.gate_proj.codebook"].__setitem__((3, 0, 2), float("nan")),
     r"model\.layers\.29\.mlp\.gate_proj\.codebook contains NaN"),
    ("codebook_shape", lambda sd: sd.update({"model.layers.0.self_attn.q_proj.codebook": torch.zeros(576, 1, 8)}),
     r"model\.layers\.0\.self_attn\.q_proj"),
    ("qweight_dtype", lambda sd: sd.update({"model.layers.1.mlp.up_proj.qweight":
                                            sd["model.layers.1.mlp.up_proj.qweight"].to(torch.int16)}),
     r"model\.layers\.1\.mlp\.up_proj\.qweight"),
    ("missing_codebook", lambda sd: sd.pop("model.layers.28.self_attn.v_proj.codebook"),
     r"model\.layers\.28\.self_attn\.v_proj\.codebook"),
], ids=lambda v: v if isinstance(v, str) and " " not in v and "\\" not in v else None)
def test_malformed_kmeans_checkpoint_errors(km_saved, tmp_path, name, fn, match):
    _, out = km_saved
    bad = _edit(out, str(tmp_path / name), fn)
    with pytest.raises(Exception, match=match):
        AutoModelForCausalLM.from_pretrained(bad)


def _tiny_llama(path, tie=True):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def test_cli_quantize_kmeans_3bit_and_tied_lm_head(tmp_path):
    from hfquant.cli import main

    src = _tiny_llama(tmp_path / "tiny")
    out = tmp_path / "tiny-km3"
    assert main(["quantize", str(tmp_path / "tiny"), str(out), "--method", "kmeans", "--bits", "3",
                 "--group-size", "32", "--skip"]) == 0
    q = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(q.lm_head, LutLinear) and q.lm_head.bits == 3 and q.lm_head.group_size == 32
    assert isinstance(q.model.layers[1].mlp.up_proj, LutLinear)
    assert torch.equal(q.model.embed_tokens.weight, src.model.embed_tokens.weight)  # embedding kept in fp32
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        a, b = src(ids).logits, q(ids).logits
    assert (a - b).abs().max() < 0.2 * a.abs().max()
    assert q.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 15)
