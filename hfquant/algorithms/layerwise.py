"""The layer-by-layer calibration pipeline of GPTQ and AWQ.

A decoder-only model is a stack of blocks (decoder layers) that each map hidden states to
hidden states. Calibrating one block needs only its own inputs, so the pipeline

1. runs the model's embedding part once per calibration window and captures the inputs of
   the first block (hidden states and the keyword arguments the model passes it: position
   embeddings, attention mask, ...), stopping the forward pass there;
2. for each block in turn: runs it over the captured inputs with forward hooks on its
   linear layers (the method collects its statistics), lets the method change or quantize
   the block, and runs it again to get the inputs of the next block.

Only one block's activations (one hidden-state tensor per window) are held at a time, and
the output head never runs.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..modeling import is_conv1d


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, blocks) of the model's stack of decoder layers.

    Takes ``model.get_decoder().layers`` where the model has it (transformers' decoder-only
    models), else the longest nn.ModuleList whose entries all hold linear layers."""
    named = dict(model.named_modules())
    name_of = {id(m): n for n, m in named.items()}
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            layers = getattr(get_decoder(), "layers", None)
        except Exception:  # noqa: BLE001 (a model without a decoder part)
            layers = None
        if isinstance(layers, nn.ModuleList) and len(layers) and id(layers) in name_of:
            return name_of[id(layers)], layers
    best: tuple[str, nn.ModuleList] | None = None
    for n, m in named.items():
        if isinstance(m, nn.ModuleList) and len(m) and all(linear_layers(b) for b in m):
            if best is None or len(m) > len(best[1]):
                best = (n, m)
    if best is None:
        raise ValueError(f"hfquant: found no stack of decoder layers in {type(model).__name__} "
                         "(calibrated methods need a transformer-style model)")
    return best


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """{name inside the block: module} of its nn.Linear and Conv1D layers."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of the first block's call for each batch of token ids."""
    device = next(model.parameters()).device
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kw):
        captured.append((tuple(args), dict(kw)))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in tqdm(batches, desc="calibration: embedding", leave=False):
            try:
                model(batch.to(device), **kwargs)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError("hfquant: the model's forward pass did not reach its first decoder layer")
    return captured


def _hidden(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """The block's outputs as the next block's inputs (same keyword arguments)."""
    outs = []
    for args, kw in inputs:
        h = _hidden(block(*args, **kw))
        outs.append(((h,) + tuple(args[1:]), kw))
    return outs


def hooked_pass(block: nn.Module, inputs, modules: dict[str, nn.Module],
                observe: Callable[[str, Tensor], None]) -> list[tuple[tuple, dict]]:
    """Runs the block over ``inputs`` with ``observe(name, x)`` called on the input x of
    each module of ``modules`` (the very tensor the module gets, so layers that read the
    same input see the same object); hooks removed after. Returns the block's outputs as
    the next block's inputs (as run_block)."""
    handles = []

    def make(name):
        def hook(module, args, kw):
            x = args[0] if args else next(iter(kw.values()))
            observe(name, x)
        return hook

    try:
        for n, m in modules.items():
            handles.append(m.register_forward_pre_hook(make(n), with_kwargs=True))
        outs = []
        with torch.no_grad():
            for args, kw in inputs:
                outs.append(((_hidden(block(*args, **kw)),) + tuple(args[1:]), kw))
    finally:
        for h in handles:
            h.remove()
    return outs


def calibrate_blocks(model: nn.Module, batches, process_block: Callable[[int, str, nn.Module, list], list | None],
                     desc: str) -> None:
    """Runs ``process_block(index, block_name, block, inputs)`` for every decoder block in
    order, with ``inputs`` the block's (args, kwargs) per window. When it returns None, the
    next block's inputs come from running the block as ``process_block`` left it (GPTQ:
    quantized); otherwise it returns them itself (AWQ: the float block's outputs, from the
    pass that collected its statistics)."""
    prefix, blocks = decoder_blocks(model)
    was_training = model.training
    model.eval()
    try:
        inputs = capture_block_inputs(model, blocks, batches)
        for i, block in enumerate(tqdm(blocks, desc=desc)):
            name = f"{prefix}.{i}" if prefix else str(i)
            outputs = process_block(i, name, block, inputs)
            inputs = run_block(block, inputs) if outputs is None else outputs
    finally:
        model.train(was_training)
