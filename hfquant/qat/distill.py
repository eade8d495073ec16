"""Distillation from the full-precision model into a quantized one.

``layerwise_distill`` (ZeroQuant's layer-by-layer knowledge distillation, Yao et al. 2022):
the decoder blocks are quantized one at a time. Each block's linear layers become
FakeQuantLinear (round to nearest to start), and the block is trained so that its output on
the inputs the *quantized* model gives it matches the full-precision block's output on the
full-precision inputs (mean squared error), then converted to QuantLinear; the next block
then sees the quantized model's activations. The pipeline of hfquant.algorithms.layerwise
holds one block's activations at a time and never runs the output head, so this is cheap
enough for a CPU.

``distill_qat`` (LLM-QAT, Liu et al. 2023): quantization-aware training of the whole model
(prepare_qat) against the full-precision model's logits as soft targets (KL divergence at a
temperature), on text the full-precision model generates itself (``generate_text``), so no
training data is needed.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import HfQuantConfig
from .fake_quant import FakeQuantLinear, is_quantized, attach_quantized, check_trainable_config, convert, prepare_qat


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _detach_inputs(inputs):
    return [((args[0].detach(),) + tuple(args[1:]), kw) for args, kw in inputs]


def layerwise_distill(model: nn.Module, config: HfQuantConfig | None = None, tokenizer=None, *,
                      batches: list[torch.Tensor] | None = None, n_samples: int = 32, seq_len: int = 512,
                      text=None, epochs: int = 4, lr: float = 1e-4, scale_lr: float | None = None,
                      train_weights: bool = True, learn_scales: bool = True, log: Callable[[str], None] | None = None,
                      **kwargs) -> nn.Module:
    """Quantizes a float model in place, block by block, each block trained to match the
    full-precision block (ZeroQuant's LKD); returns the model, quantized (QuantLinear,
    format v1) and ready to save.

    Data: ``batches`` (token ids [1, T] each), else ``n_samples`` windows of ``seq_len``
    tokens of ``text`` (a file path; None: WikiText-2 validation) with the model's tokenizer.
    Each block trains ``epochs`` passes over the windows with Adam, one window per step:
    ``lr`` for the weights (straight-through estimator), ``scale_lr`` (default lr / 10) for
    the scales when ``learn_scales``. ``train_weights=False`` trains the scales only.
    ``log`` receives one line per block: the mean squared error against the float block's
    output on the first 4 windows, with round to nearest and after training.
    Layers outside the decoder blocks that the config quantizes are rounded to nearest.
    """
    from ..algorithms.calibration import calibration_batches, model_tokenizer
    from ..algorithms.layerwise import capture_block_inputs, decoder_blocks, run_block
    from ..modeling import set_module, tied_sources, untie
    from ..replace import check_overrides, find_targets

    if config is None:
        config = HfQuantConfig(**kwargs)
    elif kwargs:
        raise ValueError("layerwise_distill: pass either a config or keyword settings, not both")
    check_trainable_config(config, "layerwise_distill")
    if is_quantized(model) or any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise ValueError("layerwise_distill: the model is already quantized; distillation starts from the float model")
    if not (train_weights or learn_scales):
        raise ValueError("layerwise_distill: nothing to train; set train_weights and/or learn_scales")
    for name, value in (("epochs", epochs),):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"layerwise_distill: {name}={value!r} must be an integer >= 0")
    if not lr > 0:
        raise ValueError(f"layerwise_distill: lr={lr!r} must be > 0")
    scale_lr = lr / 10 if scale_lr is None else scale_lr
    check_overrides(model, config)
    if batches is None:
        batches = calibration_batches(model_tokenizer(model, tokenizer, "layerwise_distill"), text, n_samples, seq_len)
    targets, kept = find_targets(model, config)
    if not targets:
        raise ValueError("layerwise_distill: the model has no nn.Linear (or Conv1D) layer to quantize")
    tied = tied_sources(model)
    for name, _, _ in targets:
        if name in tied:
            untie(model, name)
    target_names = {name: transposed for name, _, transposed in targets}
    prefix, blocks = decoder_blocks(model)
    was_training = model.training
    grad_state = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        float_in = capture_block_inputs(model, blocks, batches)
        quant_in = _detach_inputs(float_in)
        for i, block in enumerate(tqdm(blocks, desc="layer-wise distillation")):
            bname = f"{prefix}.{i}" if prefix else str(i)
            teacher = run_block(block, float_in)
            fakes = {}
            for n, m in list(block.named_modules()):
                full = f"{bname}.{n}"
                if full in target_names:
                    s = config.scheme_for(full)
                    f = FakeQuantLinear.from_linear(m, s["bits"], s["group_size"], s["symmetric"],
                                                    learn_scales=learn_scales, transposed=target_names[full],
                                                    grid=config.impl.grid_args()["grid"])
                    set_module(block, n, f)
                    fakes[n] = f
            before, after = _train_block(block, fakes, quant_in, teacher, epochs, lr, scale_lr, train_weights,
                                         learn_scales)
            for n, f in fakes.items():
                q = f.to_quantized()
                q.pack()
                set_module(block, n, q)
            if log is not None:
                log(f"{bname}: mse {before:.4g} (round to nearest) -> {after:.4g}")
            quant_in = run_block(block, quant_in)
            float_in = teacher
        del float_in, quant_in
        # what lies outside the blocks (an untied lm_head the config quantizes): round to nearest
        from ..nn import QuantLinear

        for name, transposed in target_names.items():
            module = model.get_submodule(name)
            if isinstance(module, QuantLinear):
                continue
            s = config.scheme_for(name)
            q = QuantLinear.from_float(module, s["bits"], s["group_size"], s["symmetric"], transposed=transposed,
                                       grid=config.impl.grid_args()["grid"])
            q.pack()
            set_module(model, name, q)
    finally:
        for p, g in grad_state.items():
            p.requires_grad_(g)
        model.train(was_training)
    attach_quantized(model, config, kept)
    return model


def _block_loss(block, inputs, targets, limit: int = 4) -> float:
    """Mean squared error of the block against the targets on the first ``limit`` windows (for the log)."""
    inputs, targets = inputs[:limit], targets[:limit]
    with torch.no_grad():
        total = 0.0
        for (args, kw), t in zip(inputs, targets):
            total += float(nn.functional.mse_loss(_hidden(block(*args, **kw)), t[0][0]))
        return total / max(len(inputs), 1)


def _train_block(block, fakes, inputs, targets, epochs, lr, scale_lr, train_weights, learn_scales):
    groups = []
    weights = [f.weight for f in fakes.values()]
    scales = [f.scale for f in fakes.values() if f.scale is not None]
    for w in weights:
        w.requires_grad_(train_weights)
    if train_weights:
        groups.append({"params": weights, "lr": lr})
    if learn_scales and scales:
        groups.append({"params": scales, "lr": scale_lr})
    before = _block_loss(block, inputs, targets)
    if epochs and groups:
        opt = torch.optim.Adam(groups)
        total = epochs * len(inputs)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
        with torch.enable_grad():
            for _ in range(epochs):
                for j in torch.randperm(len(inputs)).tolist():
                    args, kw = inputs[j]
                    loss = nn.functional.mse_loss(_hidden(block(*args, **kw)), targets[j][0][0])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
    for f in fakes.values():
        f.weight.requires_grad_(False)
        if f.scale is not None:
            f.scale.requires_grad_(False)
    return before, _block_loss(block, inputs, targets)


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer, n_sequences: int = 16, length: int = 256, batch_size: int = 8,
                  seed: int = 0, first_tokens: torch.Tensor | None = None) -> list[torch.Tensor]:
    """LLM-QAT's data-free training text: sequences the model samples itself (temperature 1),
    each started from one token drawn from the vocabulary (or ``first_tokens``); returns
    ``n_sequences`` token tensors [1, length]."""
    gen = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    if first_tokens is None:
        # skip the special tokens at the start of the vocabulary
        first_tokens = torch.randint(min(256, vocab - 1), vocab, (n_sequences,), generator=gen)
    torch.manual_seed(seed)
    out = []
    for b in range(0, n_sequences, batch_size):
        start = first_tokens[b:b + batch_size].reshape(-1, 1)
        seq = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                             pad_token_id=tokenizer.eos_token_id)
        out += [s[:length].unsqueeze(0) for s in seq]
    return out


def distill_qat(model: nn.Module, config: HfQuantConfig | None = None, batches: list[torch.Tensor] | None = None, *,
                teacher: nn.Module | None = None, steps: int = 100, lr: float = 1e-5, temperature: float = 1.0,
                learn_scales: bool = False, time_limit: float | None = None,
                log: Callable[[int, float], None] | None = None, **kwargs) -> nn.Module:
    """Quantization-aware training of a float model against its full-precision copy (LLM-QAT):
    prepare_qat, then ``steps`` Adam steps (cycling over ``batches``, token ids [B, T]) on the
    KL divergence between the teacher's and the student's next-token distributions at
    ``temperature``; then convert. Returns the quantized model (in place).

    ``teacher`` defaults to a frozen copy of the float model taken before training.
    ``batches`` is typically ``generate_text(model, tokenizer)`` (data-free). ``time_limit``
    (seconds) stops training early. ``log(step, loss)`` is called every step."""
    if config is None:
        config = HfQuantConfig(**kwargs)
    elif kwargs:
        raise ValueError("distill_qat: pass either a config or keyword settings, not both")
    check_trainable_config(config, "distill_qat")
    if not batches:
        raise ValueError("distill_qat: no training batches (use generate_text(model, tokenizer) for data-free QAT)")
    if teacher is None:
        teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    prepare_qat(model, config, learn_scales=learn_scales)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for m in model.modules() if isinstance(m, FakeQuantLinear)
              for p in (m.weight, m.scale) if p is not None]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    was_training = model.training
    model.train()
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            ids = batches[step % len(batches)]
            with torch.no_grad():
                t_logits = teacher(ids).logits.float()
            s_logits = model(ids).logits.float()
            loss = nn.functional.kl_div(torch.log_softmax(s_logits / temperature, -1),
                                        torch.log_softmax(t_logits / temperature, -1), log_target=True,
                                        reduction="batchmean") * temperature ** 2 / ids.shape[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log is not None:
                log(step, loss.item())
            if time_limit is not None and time.perf_counter() - t0 > time_limit:
                break
    finally:
        model.train(was_training)
    return convert(model)
