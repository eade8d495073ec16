"""Fused MoE experts (3-D gate_up_proj / down_proj): quantized on load, saved, reloaded, refused
by the methods that cannot quantize them. Tiny random models of each expert layout, no downloads."""
from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
import transformers

import hfquant
from hfquant import HfQuantConfig
from hfquant.experts import find_experts, float_leftovers, quantized_share
from hfquant.nn import Int8Linear, QuantExperts
from hfquant.nn.experts import expert_count

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, num_experts_per_tok=2, max_position_embeddings=128)
CONFIGS = {
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                                                   decoder_sparse_step=1)),
    "MixtralForCausalLM": ("MixtralConfig", dict(intermediate_size=64, num_local_experts=4)),
    "GptOssForCausalLM": ("GptOssConfig", dict(intermediate_size=64, num_local_experts=4, sliding_window=8,
                                               layer_types=["sliding_attention", "full_attention"])),
    "DeepseekV3ForCausalLM": ("DeepseekV3Config", dict(
        intermediate_size=128, moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=0, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, head_dim=None)),
    "Qwen3NextForCausalLM": ("Qwen3NextConfig", dict(
        intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=8,
        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention"])),
}
CLASSES = list(CONFIGS)
# relative logits error against the float model (random weights, group 32), measured on these
# models: 0.04-0.16 at W4, 0.002-0.008 at W8 (exactness is checked against the dequantized
# weights in test_experts_module_matches_dequantized_float)
REL_BOUND = {4: 0.25, 8: 0.02}
# llm_int8 / w8a8 (int8 activations on the linear layers, weight-only int8 experts), measured on
# these models: 0.002-0.015 (no input of these random models reaches the outlier threshold)
INT8_REL_BOUND = 0.03
REFUSING = ("kmeans", "mixed")  # gptq and awq: tests/integration/test_moe_calibrated.py


def build(cls_name: str, seed: int = 0):
    cfg_name, extra = CONFIGS[cls_name]
    kwargs = {**COMMON, **extra}
    if kwargs.get("head_dim", 0) is None:
        kwargs.pop("head_dim")
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # biases and routers non-zero, so every path is exercised
        for name, p in model.named_parameters():
            if p.dim() < 3 and ("bias" in name or "gate" in name or "router" in name) and "norm" not in name:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{class name: (directory of the saved float model, the float model)}."""
    out = {}

    def get(cls_name):
        if cls_name not in out:
            d = tmp_path_factory.mktemp(cls_name)
            model = build(cls_name)
            model.save_pretrained(d)
            out[cls_name] = (str(d), model)
        return out[cls_name]

    return get


def ids(seed=1, shape=(2, 11)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _dir_size(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cls_name", CLASSES)
def test_quantize_on_load_save_reload(saved, cls_name, bits, tmp_path):
    d, float_model = saved(cls_name)
    x = ids()
    with torch.no_grad():
        ref = float_model(x).logits
    q = transformers.AutoModelForCausalLM.from_pretrained(d,
                                                          quantization_config=HfQuantConfig(bits=bits, group_size=32))
    experts = [m for m in q.modules() if isinstance(m, QuantExperts)]
    assert len(experts) == 2 and all(m.bits == bits and m._packed for m in experts)
    # RTN's default grid ("best"; signed scales below 8 bits, checkpoint format version 2), as on the linear layers
    assert all(m.grid == "best" for m in experts)
    assert any(bool((m.gate_up_scales < 0).any()) for m in experts) == (bits < 8)
    done, total = quantized_share(q)
    assert done >= 0.99 * total, (done, total)
    assert float_leftovers(q, q.config.quantization_config) == []
    with torch.no_grad():
        out = q(x).logits
    assert rel(out, ref) < REL_BOUND[bits]
    q.save_pretrained(tmp_path)
    r = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        again = r(x).logits
    assert torch.equal(out, again)
    gen = r.generate(x[:1, :5], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 8)
    if cls_name == "Qwen3MoeForCausalLM" and bits == 4:
        assert _dir_size(tmp_path) < 0.35 * _dir_size(d), (_dir_size(tmp_path), _dir_size(d))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("cls_name", CLASSES)
def test_experts_module_matches_dequantized_float(cls_name, symmetric):
    """QuantExperts computes what the original experts class computes with the dequantized weights."""
    model = build(cls_name)
    name, module, _ = find_experts(model, HfQuantConfig(bits=4, group_size=32))[0][0]
    q = QuantExperts.from_float(module, expert_count(model.config), 4, 32, symmetric, name=name)
    deq = copy.deepcopy(module)
    with torch.no_grad():
        for p in ("gate_up", "down"):
            w = q.dequantize_weight(p, torch.float32)
            getattr(deq, f"{p}_proj").copy_(w.transpose(1, 2) if q.transposed else w)
    T, E, k = 9, q.num_experts, 2
    g = torch.Generator().manual_seed(3)
    h = torch.randn(T, 64, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    idx[0] = torch.tensor([0, 1])  # every expert but the last hit at least sometimes; one never
    idx[idx == E - 1] = 0
    wts = torch.softmax(torch.randn(T, k, generator=g), -1)
    with torch.no_grad():
        want = deq(h, idx, wts)
        got = q(h, idx, wts)
        loop = q._forward_loop(q._kernel(), h, idx, wts)  # one qlinear per expert (without hfquant::qlinear_routed)
    assert rel(got, want) < 1e-5
    assert rel(loop, want) < 1e-5
    assert torch.allclose(got, loop, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls_name", ["Qwen3MoeForCausalLM", "GptOssForCausalLM"])
def test_int8_activations_switch(cls_name):
    """hfquant.settings.int8_activations_min_m routes a call of at least that many tokens through
    hfquant::qlinear_routed_a8 (both projections), as it routes QuantLinear; fewer tokens, 8-bit
    experts and calls wanting a gradient stay on qlinear_routed."""
    model = build(cls_name)
    name, module, _ = find_experts(model, HfQuantConfig(bits=4, group_size=32))[0][0]
    E = expert_count(model.config)
    q4 = QuantExperts.from_float(module, E, 4, 32, True, name=name)
    q8 = QuantExperts.from_float(module, E, 8, 32, True, name=name)
    g = torch.Generator().manual_seed(4)
    T, k = 7, 2
    h = torch.randn(T, 64, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    wts = torch.softmax(torch.randn(T, k, generator=g), -1)

    def a8(q, x, i, w):  # the module's formula with both projections on qlinear_routed_a8
        kern, tok, ids = q._kernel(), torch.arange(x.shape[0]).repeat_interleave(k), i.reshape(-1)
        hh = q._apply_gate(q._routed(kern, "gate_up", x[tok], ids, True))
        y = q._routed(kern, "down", hh, ids, True) * w.reshape(-1)[:, None]
        return torch.zeros_like(x).index_add_(0, tok, y)

    with torch.no_grad():
        plain, plain1, plain8 = q4(h, idx, wts), q4(h[:2], idx[:2], wts[:2]), q8(h, idx, wts)
        want = a8(q4, h, idx, wts)
        assert not torch.equal(want, plain) and rel(want, plain) < 0.05
        with hfquant.settings(int8_activations_min_m=4):
            assert torch.equal(q4(h, idx, wts), want)
            assert torch.equal(q4(h[:2], idx[:2], wts[:2]), plain1)
            assert torch.equal(q8(h, idx, wts), plain8)
    with hfquant.settings(int8_activations_min_m=1):
        hg = h.clone().requires_grad_()
        torch.testing.assert_close(q4(hg, idx, wts).detach(), plain)


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, -1, False), (8, -1, True), (8, 32, False), (4, 64, True),
                                                        (3, 32, False), (2, -1, True)])
def test_schemes_and_quantize_model(saved, bits, group_size, symmetric, tmp_path):
    d, float_model = saved("Qwen3MoeForCausalLM")
    config = dict(bits=bits, group_size=group_size, symmetric=symmetric)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(d, quantization_config=HfQuantConfig(**config))
    mem = hfquant.quantize_model(copy.deepcopy(float_model), HfQuantConfig(**config))
    a, b = loaded.state_dict(), mem.state_dict()
    keys = [k for k in a if ".experts." in k]
    assert set(keys) == {f"model.layers.{i}.mlp.experts.{p}_{t}" for i in (0, 1) for p in ("gate_up", "down")
                         for t in ("qweight", "scales") + (() if symmetric else ("zeros",))}
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, mem(x).logits)
    mem.save_pretrained(tmp_path)
    r = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(r(x).logits, mem(x).logits)


@pytest.mark.parametrize("cls_name", ["Qwen3MoeForCausalLM", "GptOssForCausalLM"])
def test_bfloat16(saved, cls_name, tmp_path):
    d, float_model = saved(cls_name)
    x = ids()
    with torch.no_grad():
        ref = float_model(x).logits
    q = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16,
                                                          quantization_config=HfQuantConfig(bits=4, group_size=32))
    experts = [m for m in q.modules() if isinstance(m, QuantExperts)]
    assert experts and all(m.gate_up_scales.dtype == torch.bfloat16 for m in experts)
    with torch.no_grad():
        out = q(x).logits
    assert out.dtype == torch.bfloat16 and rel(out, ref) < REL_BOUND[4]
    q.save_pretrained(tmp_path)
    r = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(r(x).logits, out)


def test_experts_kept_by_config(saved, caplog, tmp_path):
    d, _ = saved("MixtralForCausalLM")
    with caplog.at_level(logging.WARNING, logger="hfquant"):
        q = transformers.AutoModelForCausalLM.from_pretrained(
            d, quantization_config=HfQuantConfig(bits=4, group_size=32, modules_to_not_convert=["lm_head", "experts"]))
    assert not any(isinstance(m, QuantExperts) for m in q.modules())
    assert q.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    assert "stay in full precision" not in caplog.text
    q.save_pretrained(tmp_path)
    r = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    x = ids()
    with torch.no_grad():
        assert torch.equal(r(x).logits, q(x).logits)


def test_float_leftovers_warning(saved, monkeypatch, caplog):
    """A large float matrix no hfquant module holds and the config did not exclude is named at load."""
    import hfquant.experts as ex

    d, _ = saved("MixtralForCausalLM")
    monkeypatch.setattr(ex, "LEFTOVER_MIN_ELEMENTS", 1)
    monkeypatch.setattr(ex, "is_fused_experts", lambda m: False)  # as if experts were not recognised
    with caplog.at_level(logging.WARNING, logger="hfquant"):
        transformers.AutoModelForCausalLM.from_pretrained(d, quantization_config=HfQuantConfig(bits=4, group_size=32))
    assert ("hfquant: 4 weight matrices stay in full precision although the config does not exclude them (no hfquant "
            "module quantizes them): model.layers.0.mlp.experts.gate_up_proj, model.layers.0.mlp.experts.down_proj, "
            "model.layers.1.mlp.experts.gate_up_proj, model.layers.1.mlp.experts.down_proj") in caplog.text


@pytest.mark.parametrize("key,change,message", [
    ("model.layers.0.mlp.experts.down_scales", lambda t: t.index_fill(0, torch.tensor([2]), -1.0),
     "hfquant: model.layers.0.mlp.experts.down[expert 2].scales contains negative values"),
    ("model.layers.1.mlp.experts.gate_up_qweight", lambda t: t[:7],
     "hfquant: model.layers.1.mlp.experts.gate_up_qweight has shape (7, 128, 32); expected [8, ...] (one matrix "
     "per expert)"),
    ("model.layers.1.mlp.experts.gate_up_scales", lambda t: t[:, :, :1],
     "hfquant: model.layers.1.mlp.experts.gate_up[expert 0].scales has shape (128, 1) and dtype torch.float32; "
     "expected (128, 2) floating point for group_size=32"),
], ids=["negative-scale", "expert-count", "scales-shape"])
def test_malformed_expert_tensors(saved, tmp_path, key, change, message):
    from safetensors import safe_open
    from safetensors.torch import save_file

    d, _ = saved("Qwen3MoeForCausalLM")
    # the version 1 grid, whose scales are never negative (the default grid's may be)
    transformers.AutoModelForCausalLM.from_pretrained(
        d, quantization_config=HfQuantConfig(bits=4, group_size=32, grid="range")).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    with safe_open(path, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[key] = change(tensors[key]).contiguous()
    save_file(tensors, path, metadata=meta)
    with pytest.raises(ValueError) as e:
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert str(e.value) == message


def _info(d, capsys):
    import json

    from hfquant import cli

    capsys.readouterr()
    assert cli.main(["info", str(d), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_lists_experts_and_float_leftovers(saved, monkeypatch, capsys, tmp_path):
    import hfquant.experts as ex

    d, _ = saved("MixtralForCausalLM")
    q = transformers.AutoModelForCausalLM.from_pretrained(d, quantization_config=HfQuantConfig(bits=4, group_size=32))
    q.save_pretrained(tmp_path / "q")
    monkeypatch.setattr(ex, "LEFTOVER_MIN_ELEMENTS", 1)
    info = _info(tmp_path / "q", capsys)
    assert info["quantized_expert_modules"] == 2
    assert info["unexcluded_float_matrices"] == []
    monkeypatch.setattr(ex, "is_fused_experts", lambda m: False)  # as if experts were not recognised
    q = transformers.AutoModelForCausalLM.from_pretrained(d, quantization_config=HfQuantConfig(bits=4, group_size=32))
    q.save_pretrained(tmp_path / "left")
    info = _info(tmp_path / "left", capsys)
    assert info["quantized_expert_modules"] == 0
    # transformers saves float Mixtral experts in the per-expert layout of the original checkpoints
    assert info["unexcluded_float_matrices"] == sorted(f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
                                                       for i in (0, 1) for e in range(4) for w in ("w1", "w2", "w3"))


def test_bad_layout_errors():
    model = build("Qwen3MoeForCausalLM")
    experts = model.model.layers[1].mlp.experts
    experts.gate_up_proj = torch.nn.Parameter(torch.zeros(7, 128, 64))
    with pytest.raises(ValueError) as e:
        hfquant.quantize_model(model, bits=4, group_size=32)
    assert str(e.value) == ("hfquant: model.layers.1.mlp.experts (Qwen3MoeExperts): gate_up_proj (7, 128, 64) and "
                            "down_proj (8, 64, 64) do not lead with the config's expert count 8")
    experts.gate_up_proj = torch.nn.Parameter(torch.zeros(8, 100, 64))
    with pytest.raises(ValueError) as e:
        hfquant.quantize_model(model, bits=4, group_size=32)
    assert str(e.value) == ("hfquant: model.layers.1.mlp.experts (Qwen3MoeExperts): gate_up_proj (8, 100, 64) and "
                            "down_proj (8, 64, 64) do not fit the fused experts layout [E, 2I, H] and [E, H, I]")
    # a module without a model config: the expert count cannot be checked
    bare = torch.nn.ModuleDict({"proj": torch.nn.Linear(64, 64),
                                "experts": build("Qwen3MoeForCausalLM").model.layers[0].mlp.experts})
    with pytest.raises(ValueError) as e:
        hfquant.quantize_model(bare, bits=4, group_size=32)
    assert str(e.value) == ("hfquant: experts (Qwen3MoeExperts) holds fused experts, but the model config gives no "
                            "expert count (num_experts, num_local_experts, n_routed_experts)")


@pytest.mark.parametrize("offload_buffers", [True, False])
@pytest.mark.parametrize("cls_name", ["Qwen3MoeForCausalLM", "GptOssForCausalLM"])
def test_disk_offload(saved, cls_name, offload_buffers, tmp_path, caplog):
    """accelerate's disk offload of a decoder block holding QuantExperts: with offload_buffers
    the quantized tensors stay on disk (meta in memory) and the kernel layout is derived per
    call; without, they stay in memory, packed once, and a warning says so. Outputs and
    generate are bit-identical to the model held in memory."""
    d, _ = saved(cls_name)
    q = transformers.AutoModelForCausalLM.from_pretrained(d, quantization_config=HfQuantConfig(bits=4, group_size=32))
    q.save_pretrained(tmp_path / "w4")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    off = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "w4", device_map=device_map,
                                                            offload_folder=str(tmp_path / "offload"),
                                                            offload_buffers=offload_buffers)
    experts = off.model.layers[1].mlp.experts
    assert isinstance(experts, QuantExperts)
    x = ids()
    with torch.no_grad():
        want = q(x).logits
        for _ in range(2):
            assert torch.equal(off(x).logits, want)
    if offload_buffers:
        assert experts._offloaded() and not experts._packed
        assert all(b.device.type == "meta" for b in experts.buffers())
    else:
        assert not experts._offloaded() and experts._packed
        assert "offload_buffers=True" in caplog.text
    kw = dict(max_new_tokens=3, do_sample=False)
    assert torch.equal(off.generate(x[:1, :5], **kw), q.generate(x[:1, :5], **kw))


@pytest.mark.parametrize("method", ["llm_int8", "w8a8"])
@pytest.mark.parametrize("cls_name", CLASSES)
def test_int8_methods_quantize_experts_weight_only(saved, cls_name, method, tmp_path):
    """llm_int8 / w8a8: the linear layers run int8 activations, the experts hold the same int8
    per-channel weights and multiply them weight-only; save/reload is identical."""
    d, float_model = saved(cls_name)
    x = ids()
    with torch.no_grad():
        ref = float_model(x).logits
    q = transformers.AutoModelForCausalLM.from_pretrained(d, quantization_config=HfQuantConfig(method=method))
    experts = [m for m in q.modules() if isinstance(m, QuantExperts)]
    assert len(experts) == 2 and all((m.bits, m.group_size, m.symmetric) == (8, -1, True) for m in experts)
    assert any(isinstance(m, Int8Linear) for m in q.modules())
    done, total = quantized_share(q)
    assert done >= 0.99 * total, (done, total)
    assert float_leftovers(q, q.config.quantization_config) == []
    with torch.no_grad():
        out = q(x).logits
    assert rel(out, ref) < INT8_REL_BOUND
    q.save_pretrained(tmp_path)
    r = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(isinstance(m, QuantExperts) for n, m in r.named_modules() if n.endswith("mlp.experts"))
    with torch.no_grad():
        assert torch.equal(r(x).logits, out)
    assert r.generate(x[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_float_zero_point_refused_on_experts(saved):
    d, _ = saved("MixtralForCausalLM")
    with pytest.raises(ValueError) as e:
        transformers.AutoModelForCausalLM.from_pretrained(
            d, quantization_config=HfQuantConfig(bits=4, group_size=32, symmetric=False, zero_point="float"))
    assert str(e.value) == ("hfquant: model.layers.0.mlp.experts holds fused MoE experts, which zero_point='float' "
                            "does not cover yet; use zero_point='integer', or keep them in full precision with "
                            "modules_to_not_convert=['experts']")


@pytest.mark.parametrize("method", REFUSING)
def test_methods_without_experts_refuse(saved, method):
    d, _ = saved("Qwen3MoeForCausalLM")
    with pytest.raises(ValueError) as e:
        transformers.AutoModelForCausalLM.from_pretrained(d, quantization_config=HfQuantConfig(method=method))
    assert str(e.value) == (f"hfquant: model.layers.0.mlp.experts holds fused MoE experts, which method {method!r} "
                            "cannot quantize yet; use method='rtn', or keep them in full precision with "
                            "modules_to_not_convert=['experts']")
