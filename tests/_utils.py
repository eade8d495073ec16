"""Shared test helpers. The float tolerance policy lives here, in one place."""
from __future__ import annotations

import torch

# Error allowed between a kernel output and its float64 reference, as a fraction of a
# magnitude: the reference's largest |value| (relative-to-max: a per-element relative bound
# is meaningless where outputs cancel to near zero), or, when the caller passes a larger
# `scale`, that (for quantized matmuls: max of |x| @ scales^T, the output of a one-step
# weight; when every weight dequantizes to ~0 the kernels' offset sums still cancel only
# to fp32 rounding of that size). Why each value:
#   float32  : the kernels accumulate in fp32 with the 4-bit codes offset by 128 (the
#              sums run ~10x larger than the result before the zero term cancels them),
#              and the avx512bf16 path multiplies x split into bf16 hi + lo (residual
#              below 2^-16 |x|). Observed ~1e-5; 1e-4 leaves margin.
#   float16  : the output is rounded to fp16 (2^-11 relative to each element, 4.9e-4);
#              accumulation is fp32 as above.
#   bfloat16 : the output is rounded to bf16 (2^-9, 2e-3), and the large-M path runs a
#              bf16 GEMM on weights rounded to bf16 (another 2^-9 per weight, mostly
#              cancelling over K). Observed up to ~6e-3.
TOLERANCE = {
    torch.float32: 1e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 msg: str = "", scale: float = 0.0) -> None:
    """Float outputs against a (float64) reference under the TOLERANCE policy.

    Integer tensors must be equal exactly. ``dtype`` picks the tolerance (default: the
    dtype of ``actual``); the bound is TOLERANCE[dtype] * max(max |expected|, scale).
    The shapes must match; inf/NaN must appear exactly where the reference, rounded to
    ``dtype``, has them (a float64 reference above 65504 is inf in float16).
    """
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), f"{msg}: integer tensors differ"
        return
    dtype = dtype or actual.dtype
    a, e = actual.double(), expected.double()
    e_rounded = expected.to(dtype).double()
    finite = torch.isfinite(e_rounded)
    assert torch.equal(torch.isfinite(a), finite), f"{msg}: inf/NaN differ from the reference's"
    assert torch.equal(a[~finite].nan_to_num(), e_rounded[~finite].nan_to_num()), f"{msg}: wrong inf/NaN"
    if not finite.any():
        return
    scale = max(e[finite].abs().max().item(), scale)
    err = (a[finite] - e[finite]).abs().max().item()
    tol = TOLERANCE[dtype]
    # with scale 0 (zero scales, zero activations) the outputs must match exactly
    assert err <= tol * scale, f"{msg}: max |error| {err:.3e} > {tol:g} x {scale:.3e} for {dtype}"


def train_losses(model, opt, ids: torch.Tensor, steps: int) -> list[float]:
    """Runs `steps` language-modelling steps of `model` on `ids` (labels = inputs) with `opt`;
    returns the loss of each step (shared by the training tests)."""
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def save_tiny_llama(path, seed: int = 0):
    """A small random Llama (hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 256), seeded, saved
    at ``path`` with save_pretrained; returns ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load_benchmark(name: str):
    """The module benchmarks/<name>.py, loaded by path (benchmarks/ is not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" /
                                                  f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
