"""hfquant.save_pretrained (the atomic save) interrupted between files (a fault injected into the second shard write)
leaves either the old checkpoint byte for byte, or no directory at the target at all."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch
import transformers.modeling_utils as mu
from transformers import AutoModelForCausalLM

import hfquant

IDS = torch.tensor([[1, 504, 3458, 282, 4144, 314]]) % 1024  # the slice keeps 1024 tokens


def _digest(path):
    return {f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest() for f in sorted(os.listdir(path))}


def _fail_on_call(monkeypatch, n, exc):
    real = mu.safe_save_file
    calls = []

    def save(*a, **k):
        calls.append(a[1] if len(a) > 1 else k.get("filename"))
        if len(calls) == n:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(mu, "safe_save_file", save)
    return calls


@pytest.fixture(scope="module", params=["w4g128"])
def model(request, checkpoints):
    return AutoModelForCausalLM.from_pretrained(checkpoints[request.param])


@pytest.mark.parametrize("exc", [OSError("disk full (injected)"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_interrupted_sharded_save_leaves_nothing_new(model, tmp_path, monkeypatch, exc):
    target = tmp_path / "new"
    calls = _fail_on_call(monkeypatch, 2, exc)
    with pytest.raises(type(exc)):
        hfquant.save_pretrained(model, target, max_shard_size="1MB")
    assert len(calls) == 2  # the first shard was written, then the fault
    assert not target.exists()
    assert os.listdir(tmp_path) == []  # no temporary directory left behind either


def test_interrupted_overwrite_keeps_the_old_checkpoint(model, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    hfquant.save_pretrained(model, target, max_shard_size="1MB")
    (target / "README.md").write_text("kept beside the model")
    before = _digest(target)
    _fail_on_call(monkeypatch, 3, OSError("disk full (injected)"))
    with pytest.raises(OSError, match="injected"):
        hfquant.save_pretrained(model, target, max_shard_size="2MB")
    monkeypatch.undo()
    assert _digest(target) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    again = AutoModelForCausalLM.from_pretrained(target)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_completed_overwrite_replaces_all_files(model, tmp_path):
    """A sharded checkpoint overwritten by a single-file one keeps no stale shard or index
    (which transformers would otherwise prefer), and keeps the user's other files."""
    target = tmp_path / "ckpt"
    hfquant.save_pretrained(model, target, max_shard_size="1MB")
    (target / "README.md").write_text("kept")
    hfquant.save_pretrained(model, target)
    assert sorted(os.listdir(target)) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    again = AutoModelForCausalLM.from_pretrained(target)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_in_memory_quantized_model_saves_atomically(slice_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(slice_dir)
    hfquant.quantize_model(model, hfquant.HfQuantConfig(bits=8, group_size=-1))
    _fail_on_call(monkeypatch, 1, OSError("injected"))
    with pytest.raises(OSError):
        hfquant.save_pretrained(model, tmp_path / "q")
    assert os.listdir(tmp_path) == []
