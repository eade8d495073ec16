"""hfquant/fusion.py: which norm modules get the fused forward (checked per class), and that
the fused model computes exactly what the unfused one does, in float32 and bfloat16; autograd,
compile, offload hooks and the switch keep the module's own forward."""
import pytest
import torch
import transformers as T

import hfquant
from hfquant.fusion import fuse_norms, fused_norms

from _utils import save_tiny_llama

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def _load(path, **cfg):
    return T.AutoModelForCausalLM.from_pretrained(path, quantization_config=hfquant.HfQuantConfig(
        bits=4, group_size=32, **cfg)).eval()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_llama_norms_fused_and_outputs_match(tiny_path):
    model = _load(tiny_path)
    names = fused_norms(model)
    assert names == [n for n, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(names) == 2 * 2 + 1  # two per layer and the final norm
    ids = torch.randint(3, 256, (2, 17))
    with torch.no_grad():
        fused = model(ids).logits
        with hfquant.settings(fused_ops=False):
            own = model(ids).logits
    assert torch.equal(fused, own)  # the op is bit for bit the module's formula
    # the state dict is the module's own: same keys as an unfused load
    assert "model.norm.weight" in model.state_dict() and not any("_hfquant" in k for k in model.state_dict())


def test_bfloat16_model_matches(tiny_path):
    model = T.AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.bfloat16, quantization_config=
                                                   hfquant.HfQuantConfig(bits=8, group_size=-1)).eval()
    assert len(fused_norms(model)) == 5
    ids = torch.randint(3, 256, (1, 9))
    with torch.no_grad():
        fused = model(ids).logits
        with hfquant.settings(fused_ops=False):
            own = model(ids).logits
    assert fused.dtype == torch.bfloat16 and torch.equal(fused, own)


def test_other_norm_formulas_are_left_alone(tmp_path):
    """Gemma's norm multiplies by 1 + weight: the numeric check refuses its class."""
    torch.manual_seed(0)
    cfg = T.Gemma3TextConfig(num_hidden_layers=2, head_dim=16, sliding_window=32, **SMALL)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    model = _load(tmp_path)
    assert fused_norms(model) == []
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all("forward" not in vars(m) for m in norms)


def test_gradients_use_the_modules_own_forward(tiny_path):
    model = _load(tiny_path)
    norm = model.model.norm
    x = torch.randn(2, 3, 64, requires_grad=True)
    y = norm(x)  # weights require grad and grad is on: the module's own forward, differentiable
    y.sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(norm(x), y.detach())


def test_compile_fullgraph_and_hooks(tiny_path):
    model = _load(tiny_path)
    ids = torch.randint(3, 256, (1, 7))
    with torch.no_grad():
        want = model(ids).logits
        compiled = torch.compile(model.model.norm, fullgraph=True, backend="eager")
        x = torch.randn(1, 7, 64)
        assert torch.equal(compiled(x), model.model.norm(x))
    # a module with accelerate's hook (offload) keeps its forward: fuse_norms skips it
    fresh = T.AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    norm = fresh.model.norm
    norm._hf_hook = object()
    assert fuse_norms(fresh) == 4 and "forward" not in vars(norm)
    del norm._hf_hook
    assert want.shape == (1, 7, 256)
