"""transformers integration on the real default model (SmolLM2-135M) and real text (WikiText-2)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, pipeline

import hfquant
from hfquant.evaluate import perplexity
from hfquant.nn import QuantLinear

WINDOWS = 8  # 8 windows of 512 tokens from the start of the WikiText-2 test text


@pytest.fixture(scope="module")
def fp32_ppl(model_dir, tokenizer, wikitext):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return perplexity(model, tokenizer, wikitext, max_length=512, stride=512, max_windows=WINDOWS)


@pytest.fixture(scope="module")
def w8_saved(model_dir, tokenizer, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("w8") / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=hfquant.HfQuantConfig(bits=8, group_size=-1))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, out


# Thresholds from peers measured on the same model and windows (issue 3): torchao/quanto int8
# -0.1..-0.2%; torchao int4 g64 +41%; optimum-quanto int4 (g128 asked) +60%.
@pytest.mark.parametrize("cfg,max_rel", [
    (dict(bits=8, group_size=-1), 0.005),
    (dict(bits=4, group_size=64, symmetric=False), 0.41),
    (dict(bits=4, group_size=128), 0.60),
], ids=["w8c", "w4g64a", "w4g128"])
def test_perplexity_thresholds(model_dir, tokenizer, wikitext, fp32_ppl, cfg, max_rel):
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=hfquant.HfQuantConfig(**cfg))
    n_q = sum(type(m) is QuantLinear for m in model.modules())
    assert n_q == 210  # every Linear of the 30 layers, including the 180 with in_features 576
    # below 8 bits the embedding too, at 8 bits, with the tied head sharing it (the default)
    emb = model.model.embed_tokens
    assert (getattr(emb, "bits", None), type(model.lm_head).__name__) == (
        (8, "TiedQuantLinear") if cfg["bits"] < 8 else (None, "Linear"))
    ppl = perplexity(model, tokenizer, wikitext, max_length=512, stride=512, max_windows=WINDOWS)
    rel = ppl / fp32_ppl - 1
    print(f"{cfg}: ppl {ppl:.3f} vs fp32 {fp32_ppl:.3f} ({100 * rel:+.2f}%)")
    assert abs(rel) <= max_rel if cfg["bits"] == 8 else rel <= max_rel


def test_save_reload_bit_identical_and_pipeline(w8_saved, tokenizer):
    model, out = w8_saved
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert cfg["quant_method"] == "hfquant" and cfg["format_version"] == 1 and cfg["bits"] == 8
    again = AutoModelForCausalLM.from_pretrained(out)  # no config passed
    assert isinstance(again.model.layers[3].mlp.down_proj, QuantLinear)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, again(**ids).logits)
    text = pipeline("text-generation", model=again, tokenizer=tokenizer)(
        "The capital of France is", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert "Paris" in text


def test_checkpoint_tensors_follow_format_v1(w8_saved):
    _, out = w8_saved
    sd = load_file(os.path.join(out, "model.safetensors"))
    q = sd["model.layers.0.mlp.down_proj.qweight"]
    assert q.dtype == torch.int8 and q.shape == (576, 1536)
    assert sd["model.layers.0.mlp.down_proj.scales"].shape == (576, 1)
    assert not any(k.endswith(".weight") and v.dtype == torch.int8 for k, v in sd.items())


def test_dequantize(model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=hfquant.HfQuantConfig(bits=4, group_size=64))
    ids = tokenizer("Hello world, this is", return_tensors="pt")
    with torch.no_grad():
        lq = model(**ids).logits
        model.dequantize()
        ld = model(**ids).logits
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert (lq - ld).abs().max() < 1e-2 * lq.abs().max()


def test_tied_lm_head_kept_by_default(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=hfquant.HfQuantConfig(bits=8))
    assert not isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tied_lm_head_untied_and_quantized_on_request(model_dir, tokenizer, tmp_path):
    cfg = hfquant.HfQuantConfig(bits=4, group_size=128, modules_to_not_convert=[], quantize_embeddings=False,
                                modules_override={"lm_head": {"bits": 8, "group_size": -1}})
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8
    emb = model.model.embed_tokens.weight
    assert emb.dtype == torch.float32  # the embedding lookup stays full precision
    assert (model.lm_head.dequantize_weight(torch.float32) - emb).abs().max() <= emb.abs().amax(1).max() / 127
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(again.lm_head, QuantLinear)
    assert torch.equal(again.model.embed_tokens.weight, emb)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, again(**ids).logits)


def test_load_without_import_fails_loudly(w8_saved):
    _, out = w8_saved
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({out!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "hfquant" in r.stderr + r.stdout


def _corrupt(src, dst, fn):
    import shutil

    shutil.copytree(src, dst)
    fn(dst)
    return dst


def _edit_tensors(path, edit):
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})


@pytest.mark.parametrize("name,fn,match", [
    ("missing_scales", lambda p: _edit_tensors(p, lambda sd: sd.pop("model.layers.2.self_attn.k_proj.scales")),
     r"model\.layers\.2\.self_attn\.k_proj\.scales"),
    ("wrong_shape", lambda p: _edit_tensors(p, lambda sd: sd.update(
        {"model.layers.1.mlp.up_proj.qweight": torch.zeros(1536, 100, dtype=torch.int8)})),
     r"model\.layers\.1\.mlp\.up_proj"),
    ("wrong_dtype", lambda p: _edit_tensors(p, lambda sd: sd.update(
        {"model.layers.1.mlp.up_proj.qweight": sd["model.layers.1.mlp.up_proj.qweight"].to(torch.int16)})),
     r"model\.layers\.1\.mlp\.up_proj\.qweight"),
    ("nan_scales", lambda p: _edit_tensors(p, lambda sd: sd["model.layers.4.mlp.gate_proj.scales"].fill_(float("nan"))),
     r"model\.layers\.4\.mlp\.gate_proj\.scales contains NaN"),
    ("unknown_format_version", lambda p: _edit_config(p, format_version=7), "format_version=7"),
    ("bad_bits", lambda p: _edit_config(p, bits=5), "bits=5"),
    ("truncated", lambda p: _truncate(os.path.join(p, "model.safetensors")), r"(?i)safetensors|header|incomplete|deserializ"),
], ids=lambda v: v if isinstance(v, str) and " " not in v and "\\" not in v else None)
def test_malformed_checkpoint_errors(w8_saved, tmp_path, name, fn, match):
    _, out = w8_saved
    bad = _corrupt(out, str(tmp_path / name), fn)
    with pytest.raises(Exception, match=match):
        AutoModelForCausalLM.from_pretrained(bad)


def _edit_config(path, **kw):
    f = os.path.join(path, "config.json")
    cfg = json.load(open(f))
    cfg["quantization_config"].update(kw)
    json.dump(cfg, open(f, "w"))


def _truncate(f):
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)


def test_interrupted_save_leaves_no_loadable_dir(w8_saved, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    model, _ = w8_saved
    target = tmp_path / "new"

    def boom(*a, **k):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(mu, "safe_save_file", boom)
    with pytest.raises(OSError, match="injected"):
        hfquant.save_pretrained(model, str(target))
    assert not target.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("new")]  # no temp dir left behind

    # an existing checkpoint survives a failed overwrite untouched
    monkeypatch.undo()
    hfquant.save_pretrained(model, str(target))
    before = sorted(os.listdir(target))
    monkeypatch.setattr(mu, "safe_save_file", boom)
    with pytest.raises(OSError):
        hfquant.save_pretrained(model, str(target))
    assert sorted(os.listdir(target)) == before
    monkeypatch.undo()
    AutoModelForCausalLM.from_pretrained(str(target))


def test_quantize_model_in_memory_saves_and_reloads(model_dir, tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    hfquant.quantize_model(model, hfquant.HfQuantConfig(bits=4, group_size=128))
    out = str(tmp_path / "inmem")
    model.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("A short test", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, again(**ids).logits)


def test_gpt2_conv1d_quantized(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=96, n_head=4, vocab_size=300, n_positions=64)
    src = GPT2LMHeadModel(cfg).eval()
    src.save_pretrained(tmp_path / "gpt2")
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", quantization_config=hfquant.HfQuantConfig(bits=8, group_size=-1))
    assert isinstance(q.transformer.h[0].attn.c_attn, QuantLinear)
    # the Conv1D weight [in, out] was transposed before quantizing
    w = src.transformer.h[0].mlp.c_fc.weight.t()
    wq = q.transformer.h[0].mlp.c_fc.dequantize_weight(torch.float32)
    assert (wq - w).abs().max() <= w.abs().amax(dim=1, keepdim=True).max() / 127
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        a, b = src(ids).logits, q(ids).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    q.save_pretrained(tmp_path / "gpt2q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2q")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, b)


def test_cuda_device_map_on_cpu_build_is_refused(model_dir):
    if hfquant._ext._C.cuda_built:
        pytest.skip("this build has CUDA kernels")
    with pytest.raises(ValueError, match="no CUDA kernels"):
        AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=hfquant.HfQuantConfig(), device_map="cuda")


def test_deepcopy_saves_the_copy(w8_saved, tmp_path):
    import copy

    model, _ = w8_saved
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.model.layers[0].mlp.down_proj.scales.mul_(2)  # make the copy differ
    clone.save_pretrained(str(tmp_path / "clone"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "clone"))
    assert torch.equal(again.model.layers[0].mlp.down_proj.scales, clone.model.layers[0].mlp.down_proj.scales)
    assert not torch.equal(again.model.layers[0].mlp.down_proj.scales, model.model.layers[0].mlp.down_proj.scales)
