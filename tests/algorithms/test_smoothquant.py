"""SmoothQuant: calibration windows, activation ranges of the real model, folding that keeps the
float function (real SmolLM2-135M and tiny Llama variants), run-time factors elsewhere."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hfquant.algorithms import (apply_smoothquant, calibration_batches, collect_input_absmax,
                                smoothing_factors)


def _max_logit_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _divide_inputs(model: nn.Module, factors: dict[str, torch.Tensor]) -> list:
    """Hooks that divide each named module's input by its factor (what run-time smoothing does)."""
    named = dict(model.named_modules())
    return [named[n].register_forward_pre_hook(lambda m, args, s=s: (args[0] / s.to(args[0].dtype),) + args[1:])
            for n, s in factors.items()]


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------- calibration


def test_calibration_batches_shapes_determinism_and_default_text(tokenizer):
    a = calibration_batches(tokenizer, n_samples=4, seq_len=32)
    assert len(a) == 4 and all(b.shape == (1, 32) and b.dtype == torch.long for b in a)
    b = calibration_batches(tokenizer, n_samples=4, seq_len=32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = calibration_batches(tokenizer, n_samples=4, seq_len=32, seed=1)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_calibration_windows_are_slices_and_do_not_overlap(tokenizer, wikitext, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(wikitext[:20000], encoding="utf-8")
    ids = torch.tensor(tokenizer(wikitext[:20000], add_special_tokens=False)["input_ids"])
    windows = ids.unfold(0, 50, 1)  # every 50-token slice of the text
    starts = []
    for w in calibration_batches(tokenizer, str(path), n_samples=8, seq_len=50, seed=3):
        hits = (windows == w[0]).all(1).nonzero().flatten().tolist()
        assert hits, "a window is not a slice of the text"
        starts.append(hits[0])
    starts.sort()
    assert all(b - a >= 50 for a, b in zip(starts, starts[1:]))
    # with no slack (n_samples x seq_len == all the tokens) the windows tile the text in order
    tiled = calibration_batches(tokenizer, path, n_samples=ids.numel(), seq_len=1)
    assert torch.equal(torch.cat([w[0] for w in tiled]), ids)


def test_calibration_errors(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A short text of a few words.", encoding="utf-8")
    n_tok = len(tokenizer(short.read_text(), add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match=rf"has {n_tok} tokens; n_samples=4 x seq_len=512 needs 2048"):
        calibration_batches(tokenizer, str(short), n_samples=4, seq_len=512)
    for bad in (0, -1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="n_samples must be an int >= 1"):
            calibration_batches(tokenizer, str(short), n_samples=bad)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        calibration_batches(tokenizer, str(short), seq_len=0)
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        calibration_batches(tokenizer, str(missing))


# ----------------------------------------------------------------------------- formula


def test_smoothing_factors_formula():
    a = torch.tensor([4.0, 0.0, 9.0, 1.0, 1e12])
    w1 = torch.tensor([[1.0, 2.0, -3.0, 0.0, 1e-12], [-2.0, 1.0, 1.0, 0.0, 0.0]])
    w2 = torch.tensor([[0.5, -4.0, 1.0, 0.0, 0.0]])  # column max |W|: [2, 4, 3, 0, 1e-12]
    s = smoothing_factors(a, [w1, w2], 0.5)
    # 4^.5/2^.5; act 0 -> 1; 9^.5/3^.5; weight 0 -> 1; 1e12^.5/1e-12^.5 = 1e12 -> clamped to 1e5
    expect = torch.tensor([2 ** 0.5, 1.0, 3 ** 0.5, 1.0, 1e5])
    assert s.dtype == torch.float32 and torch.allclose(s, expect, rtol=1e-6)
    assert torch.allclose(smoothing_factors(a[:4], [w1[:, :4]], 1.0), torch.tensor([4.0, 1.0, 9.0, 1.0]))
    assert torch.allclose(smoothing_factors(a[:4], [w1[:, :4]], 0.0), torch.tensor([0.5, 1.0, 1 / 3, 1.0]))
    # bf16 inputs are computed in float32
    assert smoothing_factors(a[:4].bfloat16(), [w1[:, :4].bfloat16()], 0.5).dtype == torch.float32


def test_alpha_out_of_range():
    lin = nn.Linear(4, 3)
    before = lin.weight.detach().clone()
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha must be in"):
            smoothing_factors(torch.ones(4), [lin.weight], alpha)
        with pytest.raises(ValueError, match="alpha must be in"):
            apply_smoothquant(nn.Sequential(lin), {"0": torch.ones(4)}, alpha=alpha)
    assert torch.equal(lin.weight, before)


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def calib(tokenizer):
    return calibration_batches(tokenizer, n_samples=2, seq_len=64)


@pytest.fixture(scope="module")
def real(model_dir, calib):
    """(model, its input ranges) before smoothing; tests that smooth use their own copy."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, collect_input_absmax(model, calib)


def test_collect_input_absmax_real_model(real):
    model, absmax = real
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 211 and set(absmax) == set(linears)
    for n, a in absmax.items():
        assert a.shape == (linears[n].in_features,) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert _no_hooks(model)
    # q/k/v read one input
    layer = "model.layers.7.self_attn."
    assert torch.equal(absmax[layer + "q_proj"], absmax[layer + "v_proj"])
    # this model has activation outliers (in the thousands) at the inputs of down_proj
    down = [a.max().item() for n, a in absmax.items() if n.endswith("down_proj")]
    assert max(down) > 100


def test_hooks_removed_when_forward_fails():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(RuntimeError):
        collect_input_absmax(model, [torch.randn(3, 8), torch.randn(3, 5)])
    assert _no_hooks(model)
    with pytest.raises(ValueError, match="no module named 'fc'"):
        collect_input_absmax(model, [torch.randn(3, 8)], modules=["0", "fc"])


def test_apply_preserves_function_and_shrinks_outliers(real, calib, tokenizer, wikitext):
    original, absmax = real
    model = copy.deepcopy(original)
    head = model.lm_head.weight.detach().clone()
    ids = tokenizer(wikitext[:4000], return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        before = model(ids).logits
    runtime = apply_smoothquant(model, absmax, alpha=0.5)
    assert runtime == {}  # everything folds in a Llama; lm_head is skipped
    with torch.no_grad():
        after = model(ids).logits
    assert _max_logit_diff(after, before) <= 1e-3
    assert torch.equal(model.lm_head.weight, head) and model.lm_head.weight is model.model.embed_tokens.weight
    q, q0 = model.model.layers[0].self_attn.q_proj, original.model.layers[0].self_attn.q_proj
    assert not torch.equal(q.weight, q0.weight)  # the weights did change

    again = collect_input_absmax(model, calib)
    downs = [n for n in absmax if n.endswith("down_proj")]
    assert all(again[n].max() <= absmax[n].max() for n in downs)
    worst_before = max(absmax[n].max().item() for n in downs)
    worst_after = max(again[n].max().item() for n in downs)
    assert worst_after < worst_before / 10, (worst_before, worst_after)


# ----------------------------------------------------------------------------- run-time factors


def test_toy_model_gets_runtime_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [torch.randn(3, 5, 8) * torch.tensor([1.0] * 7 + [50.0]) for _ in range(2)]
    absmax = collect_input_absmax(model, batches)
    assert set(absmax) == {"0", "2"}
    x = batches[0]
    with torch.no_grad():
        y = model(x)
    factors = apply_smoothquant(model, absmax, alpha=0.5, skip=[])
    assert set(factors) == {"0", "2"}
    assert factors["0"].shape == (8,) and factors["2"].shape == (16,)
    assert factors["0"][7] > 3 * factors["0"][:7].max()  # the outlier channel gets the largest factor
    with torch.no_grad():
        assert (model(x) - y).abs().max() > 1e-2  # the weights changed: the inputs must be divided
        hooks = _divide_inputs(model, factors)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    for h in hooks:
        h.remove()
    # skip: not smoothed, no factor
    model2 = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    w = model2[2].weight.detach().clone()
    assert set(apply_smoothquant(model2, absmax, skip=["2"])) == {"0"}
    assert torch.equal(model2[2].weight, w)


# ----------------------------------------------------------------------------- tiny Llamas


class OnePlusNorm(nn.Module):
    """RMSNorm that multiplies by (1 + weight) (Gemma): its weight cannot absorb 1/s."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n) * 0.3)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def _tiny_llama(norm: str, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=True,
                      mlp_bias=True, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # random everything, with a few outlier input channels
            p.copy_(torch.randn_like(p) * 0.2)
        model.model.embed_tokens.weight[:, 3] *= 30
        for layer in model.model.layers:
            if norm == "layernorm":
                layer.input_layernorm, layer.post_attention_layernorm = nn.LayerNorm(32), nn.LayerNorm(32)
            elif norm == "one_plus":
                layer.input_layernorm, layer.post_attention_layernorm = OnePlusNorm(32), OnePlusNorm(32)
            for n in (layer.input_layernorm, layer.post_attention_layernorm):
                n.weight.copy_(torch.randn(32))
                if getattr(n, "bias", None) is not None:
                    n.bias.copy_(torch.randn(32))
    return model


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm", "one_plus"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tiny_llama_folds(norm, dtype):
    model = _tiny_llama(norm).to(dtype)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 97, (1, 24), generator=gen) for _ in range(2)]
    absmax = collect_input_absmax(model, batches)
    with torch.no_grad():
        before = model(batches[0]).logits
    factors = apply_smoothquant(model, absmax, alpha=0.5)
    assert all(p.dtype == dtype for p in model.parameters())
    if norm == "one_plus":  # q/k/v and gate/up need run-time smoothing; down and o still fold
        expect = {f"model.layers.{i}.{p}" for i in range(2)
                  for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
        assert set(factors) == expect
        _divide_inputs(model, factors)
    else:
        assert factors == {}
    with torch.no_grad():
        after = model(batches[0]).logits
    assert _max_logit_diff(after, before) <= (1e-4 if dtype == torch.float32 else 5e-2)


def test_tied_weights_refused():
    model = _tiny_llama("rmsnorm", tie=True)
    absmax = collect_input_absmax(model, [torch.randint(0, 97, (1, 8))])
    assert apply_smoothquant(model, absmax) == {}  # lm_head skipped by default
    head = model.lm_head.weight.detach().clone()
    with pytest.raises(ValueError, match="tied"):
        apply_smoothquant(model, {"lm_head": absmax["lm_head"]}, skip=[])
    assert torch.equal(model.lm_head.weight, head)
