"""Fused MoE experts calibrated by GPTQ and AWQ: each expert on the tokens routed to it, an expert
that receives none rounded to nearest and reported; saved and reloaded. Tiny random models (hidden
64, 4 experts, top-2) with a byte-level tokenizer built here, no downloads."""
from __future__ import annotations

import copy
import logging
import random

import pytest
import torch
import transformers

import hfquant
from hfquant import HfQuantConfig
from hfquant.algorithms.calibration import calibration_batches
from hfquant.formats import dequantize, quantize_rtn
from hfquant.nn import QuantExperts

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, num_experts_per_tok=2, max_position_embeddings=128)
CONFIGS = {
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                                                   decoder_sparse_step=1)),
    "MixtralForCausalLM": ("MixtralConfig", dict(intermediate_size=64, num_local_experts=4)),
}
CLASSES = list(CONFIGS)
METHODS = ["gptq", "awq"]
N_SAMPLES, SEQ_LEN = 4, 64
WORDS = ("river stone market engine winter garden signal copper orbit lantern harbor violin census thunder quiet "
         "yellow ancient rapid forty seven hundred measure village planet theory silver bridge mountain paper "
         "careful brought across between during against without although because whether several").split()


def _byte_tokenizer():
    """A byte-level tokenizer of 256 tokens (one per byte), built here: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(ByteLevel.alphabet())}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def _text() -> str:
    """About 2,000 words of varied text: sentences of random words, numbers and punctuation."""
    rng = random.Random(0)
    out = []
    for _ in range(200):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, len(words)), str(rng.randint(0, 9999)))
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ";", ","]))
    return " ".join(out) + "\n"


def build(cls_name: str, seed: int = 0):
    cfg_name, extra = CONFIGS[cls_name]
    config = getattr(transformers, cfg_name)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # routers that spread tokens over the experts
        for name, p in model.named_parameters():
            if p.dim() == 2 and "gate" in name and "norm" not in name:
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(calibration text path, tokenizer, {class name: (saved float model dir, float model)})."""
    root = tmp_path_factory.mktemp("moe_calibrated")
    text = root / "calibration.txt"
    text.write_text(_text(), encoding="utf-8")
    tok = _byte_tokenizer()
    models = {}
    for cls_name in CLASSES:
        d = root / cls_name
        model = build(cls_name)
        model.save_pretrained(d)
        tok.save_pretrained(d)
        models[cls_name] = (str(d), model)
    return str(text), tok, models


def _config(method: str, text: str) -> HfQuantConfig:
    return HfQuantConfig(method=method, bits=4, group_size=32,
                         calibration={"text": text, "n_samples": N_SAMPLES, "seq_len": SEQ_LEN})


def _experts(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith(".experts")}


def _routed_inputs(model, tok, text) -> dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]]:
    """{experts module name: per expert (gate_up inputs [t, H], down inputs [t, I]) of the tokens
    routed to it on the calibration windows, through the float model; None for an expert without}."""
    from hfquant.algorithms.gptq import expert_activation

    got: dict[str, list] = {}
    handles = []
    for name, m in _experts(model).items():
        got[name] = [[] for _ in range(m.num_experts)]

        def hook(module, args, name=name):
            hidden, idx = args[0], args[1]
            for e in range(module.num_experts):
                tok_ = (idx == e).any(-1).nonzero().flatten()
                if tok_.numel():
                    x = hidden[tok_]
                    h = expert_activation(module, torch.nn.functional.linear(x, module.gate_up_proj[e]))
                    got[name][e].append((x, h))
        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in calibration_batches(tok, text, N_SAMPLES, SEQ_LEN):
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return {n: [(torch.cat([x for x, _ in p]), torch.cat([h for _, h in p])) if p else None for p in per]
            for n, per in got.items()}


def _rtn(w: torch.Tensor) -> torch.Tensor:
    q = quantize_rtn(w, 4, 32, True)
    return dequantize(q.qweight, q.scales, q.zeros, 4, 32, w.shape[1], torch.float32)


@pytest.mark.parametrize("cls_name", CLASSES)
def test_gptq_experts_beat_rtn(setup, cls_name):
    """Every GPTQ expert matrix reproduces its float output on the tokens routed to it better than
    round to nearest does."""
    text, tok, models = setup
    _, float_model = models[cls_name]
    routed = _routed_inputs(float_model, tok, text)
    q = hfquant.quantize_model(copy.deepcopy(float_model), _config("gptq", text), tokenizer=tok)
    qexperts, fexperts = _experts(q), _experts(float_model)
    assert len(qexperts) == 2 and all(isinstance(m, QuantExperts) for m in qexperts.values())
    checked = 0
    for name, per in routed.items():
        for p, k in (("gate_up", 0), ("down", 1)):
            deq = qexperts[name].dequantize_weight(p, torch.float32)
            for e, inputs in enumerate(per):
                assert inputs is not None, f"{name} expert {e} received no token"
                x, w = inputs[k], getattr(fexperts[name], f"{p}_proj")[e].detach()
                err = (x @ (w - deq[e]).t()).pow(2).sum().item()
                err_rtn = (x @ (w - _rtn(w)).t()).pow(2).sum().item()
                assert err < 0.9 * err_rtn, (name, p, e, err, err_rtn)
                checked += 1
    assert checked == 2 * 2 * 4


def _expert_output(gate_up: torch.Tensor, down: torch.Tensor, module, x: torch.Tensor) -> torch.Tensor:
    from hfquant.algorithms.gptq import expert_activation

    return expert_activation(module, x @ gate_up.t()) @ down.t()


@pytest.mark.parametrize("cls_name", CLASSES)
def test_awq_experts_beat_rtn(setup, cls_name):
    """Every AWQ expert reproduces its float output on the tokens routed to it better than round to
    nearest does; the joint input scale (folded into the post-attention norm) and the per-expert
    down scales (folded into up) are undone through the norm weights and cancel inside the expert."""
    text, tok, models = setup
    _, float_model = models[cls_name]
    routed = _routed_inputs(float_model, tok, text)
    q = hfquant.quantize_model(copy.deepcopy(float_model), _config("awq", text), tokenizer=tok)
    qexperts, fexperts = _experts(q), _experts(float_model)
    assert len(qexperts) == 2 and all(isinstance(m, QuantExperts) for m in qexperts.values())
    scaled = 0
    for name, per in routed.items():
        norm = name.rsplit(".", 2)[0] + ".post_attention_layernorm.weight"
        s = float_model.get_submodule(norm.rsplit(".", 1)[0]).weight / q.get_submodule(norm.rsplit(".", 1)[0]).weight
        scaled += int(not torch.allclose(s, torch.ones_like(s)))
        f, qm = fexperts[name], qexperts[name]
        gu_q, down_q = qm.dequantize_weight("gate_up", torch.float32), qm.dequantize_weight("down", torch.float32)
        for e, inputs in enumerate(per):
            assert inputs is not None, f"{name} expert {e} received no token"
            x = inputs[0]
            gu, down = f.gate_up_proj[e].detach(), f.down_proj[e].detach()
            want = _expert_output(gu, down, f, x)
            err = (_expert_output(gu_q[e], down_q[e], f, x / s) - want).pow(2).sum().item()
            err_rtn = (_expert_output(_rtn(gu), _rtn(down), f, x) - want).pow(2).sum().item()
            assert err < err_rtn, (name, e, err, err_rtn)
    assert scaled >= 1  # the joint scale was searched and folded somewhere


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cls_name", CLASSES)
def test_save_reload_identical(setup, cls_name, method, tmp_path):
    text, _, models = setup
    d, float_model = models[cls_name]
    q = transformers.AutoModelForCausalLM.from_pretrained(d, quantization_config=_config(method, text))
    assert sum(isinstance(m, QuantExperts) for m in q.modules()) == 2
    x = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, ref = q(x).logits, float_model(x).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.25
    q.save_pretrained(tmp_path)
    r = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert r.config.quantization_config.method == method
    with torch.no_grad():
        assert torch.equal(r(x).logits, out)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cls_name", CLASSES)
def test_expert_without_tokens_falls_back_to_rtn(setup, cls_name, method, caplog):
    """An expert the router never picks during calibration is rounded to nearest, and one warning
    names it."""
    text, tok, models = setup
    _, float_model = models[cls_name]
    model = copy.deepcopy(float_model)
    starved = 3

    def reroute(module, args):  # expert 3's slots go to the lowest expert id the token does not use
        hidden, idx, weights = args
        idx = idx.clone()
        for t, s in (idx == starved).nonzero().tolist():
            idx[t, s] = min(set(range(starved)) - set(idx[t].tolist()))
        return hidden, idx, weights

    handles = [m.register_forward_pre_hook(reroute) for m in _experts(model).values()]
    names = list(_experts(model))
    float_experts = {n: {p: getattr(m, f"{p}_proj").detach().clone() for p in ("gate_up", "down")}
                     for n, m in _experts(model).items()}
    with caplog.at_level(logging.WARNING, logger="hfquant"):
        hfquant.quantize_model(model, _config(method, text), tokenizer=tok)
    for h in handles:
        h.remove()
    warnings = [r.getMessage() for r in caplog.records if "routed no tokens" in r.getMessage()]
    assert warnings == [f"hfquant: {method.upper()} calibration routed no tokens to 2 experts, rounded to nearest "
                        f"instead: {names[0]} (expert 3); {names[1]} (expert 3)"]
    # AWQ's joint input scale multiplies every expert's gate_up, the starved one's too
    for p in ("gate_up", "down") if method == "gptq" else ("down",):
        for n, m in _experts(model).items():
            assert isinstance(m, QuantExperts)
            assert torch.equal(m.dequantize_weight(p, torch.float32)[starved], _rtn(float_experts[n][p][starved]))
