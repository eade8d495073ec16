"""Calibration data: token windows of a text, and running a model over them (for hooks)."""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm


def calibration_batches(tokenizer, text: str | os.PathLike | None = None, n_samples: int = 32,
                        seq_len: int = 512, seed: int = 0) -> list[torch.LongTensor]:
    """``n_samples`` non-overlapping token windows of shape [1, seq_len], for calibration.

    ``text`` is the path of a UTF-8 text file; None takes the WikiText-2 validation split
    (never the test split that evaluation scores). The whole text is tokenized once (no
    special tokens); the window starts are drawn from a generator seeded with ``seed``, so
    the same arguments give the same windows.
    """
    for name, value in (("n_samples", n_samples), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"calibration_batches: {name} must be an int >= 1, got {value!r}")
    if text is None:
        from .. import data

        content = data.wikitext_valid()
    else:
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"calibration_batches: no calibration text file at {str(path)!r}")
        content = path.read_text(encoding="utf-8").replace("\r\n", "\n")

    # verbose=False: the whole text is longer than the model's context, which is fine here.
    ids = tokenizer(content, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    need = n_samples * seq_len
    if ids.numel() < need:
        raise ValueError(f"calibration text has {ids.numel()} tokens; n_samples={n_samples} x seq_len={seq_len} "
                         f"needs {need}; give a longer text or fewer/shorter samples")

    # Non-overlapping windows spread at random: n sorted offsets in [0, slack], the i-th window
    # starting i * seq_len after its offset (consecutive starts then differ by >= seq_len).
    gen = torch.Generator().manual_seed(seed)
    slack = ids.numel() - need
    offsets = torch.randint(0, slack + 1, (n_samples,), generator=gen).sort().values
    starts = offsets + torch.arange(n_samples) * seq_len
    return [ids[s:s + seq_len].unsqueeze(0) for s in starts.tolist()]


@torch.no_grad()
def run_calibration(model: nn.Module, batches, desc: str = "calibrating") -> None:
    """Runs ``model`` forward on each batch (no grad, no KV cache, eval mode), for the hooks it holds.

    Batches are moved to the model's device; the model's train/eval mode is restored afterwards.
    """
    device = next(model.parameters()).device
    # transformers models take use_cache; a plain nn.Module may not.
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc=desc):
            model(batch.to(device), **kwargs)
    finally:
        model.train(was_training)


def model_tokenizer(model: nn.Module, tokenizer=None, what: str = "calibration"):
    """``tokenizer``, or the one saved beside the model (its name_or_path)."""
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 (any loading failure means: no tokenizer there)
        raise ValueError(f"hfquant: {what} needs the model's tokenizer, and none loads from {source!r} ({e}); "
                         "pass tokenizer=... to quantize_model") from e


def config_batches(model: nn.Module, config, tokenizer=None, what: str = "calibration") -> list[torch.LongTensor]:
    """The calibration windows HfQuantConfig.calibration asks for, tokenized with the model's tokenizer."""
    c = config.calibration
    return calibration_batches(model_tokenizer(model, tokenizer, what), c["text"], c["n_samples"], c["seq_len"])
