"""torch.compile over hfquant's modules: no graph break (fullgraph=True), same outputs as
eager; and generate with a compiled forward on a slice of the default model."""
import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, CompileConfig

import hfquant
from hfquant import formats
from hfquant.nn import Int8Linear, LutLinear, QuantLinear


@pytest.fixture(scope="module")
def real_linear(model_dir):
    """down_proj of block 0 of the default model: nn.Linear(1536, 576), pretrained weights."""
    with safe_open(f"{model_dir}/model.safetensors", framework="pt") as f:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return lin


def _quantize(lin, **cfg):
    import copy

    return hfquant.quantize_model(nn.Sequential(copy.deepcopy(lin)), hfquant.HfQuantConfig(**cfg))


@pytest.mark.parametrize("cfg,cls", [
    (dict(bits=4, group_size=128), QuantLinear),
    (dict(bits=8, group_size=-1, symmetric=False), QuantLinear),
    (dict(method="llm_int8", fold_norms=False), Int8Linear),
    (dict(method="w8a8"), Int8Linear),
    (dict(method="kmeans", bits=4), LutLinear),
], ids=["w4g128", "w8a", "llm_int8", "w8a8", "kmeans4"])
def test_fullgraph_module(real_linear, cfg, cls):
    q = _quantize(real_linear, **cfg)
    assert isinstance(q[0], cls)
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True)  # a graph break raises
    for shape in [(1, 1536), (3, 7, 1536)]:  # decode and prefill shapes
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        if cls is Int8Linear:
            x[..., 5] *= 40  # an outlier column for LLM.int8
        assert torch.equal(compiled(x), q(x))


def test_fullgraph_act_order_permutation(real_linear):
    w = real_linear.weight.detach()
    perm = torch.argsort(w.pow(2).sum(0), descending=True)  # the shape of GPTQ's act-order
    m = QuantLinear.from_quantized(formats.quantize_rtn(w[:, perm], 4, 128, True), None, perm=perm)
    x = torch.randn(2, 5, 1536, generator=torch.Generator().manual_seed(1))
    want = m(x)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(m, fullgraph=True)(x), want)


def test_generate_with_compiled_forward(model_dir, tokenizer):
    """One decoder block of the default model at W4 g128; transformers' own generate path
    compiles the forward (static cache, compile_config with fullgraph=True). aot_eager runs
    the fake kernels through AOT tracing without inductor's code generation (minutes on 2
    cores); benchmarks/bench_compile.py measures inductor."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=1,
                                                 quantization_config=hfquant.HfQuantConfig(bits=4, group_size=128))
    assert model.hf_quantizer.is_compileable
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=6, do_sample=False, cache_implementation="static", pad_token_id=tokenizer.eos_token_id)
    eager = model.generate(ids, disable_compile=True, **kw)
    cc = CompileConfig(fullgraph=True, backend="aot_eager", dynamic=False)
    cc._compile_all_devices = True
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = model.generate(ids, compile_config=cc, **kw)
    assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] >= 1  # the forward really was compiled
    assert not counters["graph_break"]


@pytest.mark.parametrize("cls_name", ["Qwen3MoeForCausalLM", "GptOssForCausalLM"])
def test_fullgraph_moe_model(cls_name, tmp_path):
    """A whole W4 MoE model (fused experts as hfquant.nn.QuantExperts, both layouts) compiles
    without a graph break and matches eager; inside a graph a slot routed nowhere (id E) weighs 0
    instead of being filtered out (a data-dependent shape), with the eager result."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
    from test_moe import build, ids

    from hfquant.nn import QuantExperts

    build(cls_name).save_pretrained(tmp_path)
    q = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=hfquant.HfQuantConfig(bits=4, group_size=32))
    x = ids()
    torch._dynamo.reset()
    with torch.no_grad():
        ref = q(x).logits
        got = torch.compile(q, fullgraph=True)(x).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)

    experts = next(m for m in q.modules() if isinstance(m, QuantExperts))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, experts.hidden_dim, generator=g)
    index = torch.randint(0, experts.num_experts, (6, 2), generator=g)
    index[1, 0] = index[4, 1] = experts.num_experts  # routed nowhere
    weights = torch.rand(6, 2, generator=g)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = experts(h, index, weights)
        compiled = torch.compile(experts, fullgraph=True)(h, index, weights)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
