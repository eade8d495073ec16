"""hfquant verify: the per-tensor checksums save writes into the safetensors metadata find a
flipped code byte or a zeroed scale that loading accepts without a word."""
from __future__ import annotations

import json
import os
import shutil
import zlib

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hfquant
from hfquant.cli import main as cli_main
from hfquant.verify import CHECKSUMS_KEY, verify_checkpoint

QWEIGHT = "model.layers.1.mlp.down_proj.qweight"
SCALES = "model.layers.0.self_attn.k_proj.scales"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{"float": a float checkpoint, "single": its W4 save, "sharded": the W4 save in shards}."""
    root = tmp_path_factory.mktemp("verify")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(root / "float")
    model = AutoModelForCausalLM.from_pretrained(root / "float",
                                                 quantization_config=hfquant.HfQuantConfig(bits=4, group_size=32))
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    return {k: root / k for k in ("float", "single", "sharded")}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _data_range(file, name):
    """(start, end) byte offsets of a tensor's data in a safetensors file."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    b, e = header[name]["data_offsets"]
    return 8 + n + b, 8 + n + e


def _shard_of(folder, name):
    with open(folder / "model.safetensors.index.json") as f:
        return folder / json.load(f)["weight_map"][name]


def _tensor_count(folder):
    count = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            count += len(sf.keys())
    return count


def test_untouched_checkpoint_is_ok(saved, capsys):
    n = _tensor_count(saved["single"])
    assert cli_main(["verify", str(saved["single"])]) == 0
    assert capsys.readouterr().out == f"ok: {n} tensors in 1 file\n"
    shards = len(list(saved["sharded"].glob("*.safetensors")))
    assert shards > 2
    assert cli_main(["verify", str(saved["sharded"])]) == 0
    assert capsys.readouterr().out == f"ok: {n} tensors in {shards} files\n"
    result = verify_checkpoint(saved["single"])
    assert result and (result.status, result.tensors, result.files, result.unchecked) == (0, n, 1, [])


def test_checksums_are_crc32_of_the_stored_bytes(saved):
    """Every shard's metadata holds the checksum of each of its tensors, computed from its bytes."""
    for f in sorted(saved["sharded"].glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            sums = json.loads(sf.metadata()[CHECKSUMS_KEY])
            assert sf.metadata()["hfquant_checksum_algorithm"] == "crc32"
            for name in sf.keys():
                raw = sf.get_tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                assert sums[name] == f"{zlib.crc32(raw):08x}", name


def test_flipped_code_byte_is_named(saved, tmp_path, capsys):
    folder = _copy(saved["single"], tmp_path / "ckpt")
    file = folder / "model.safetensors"
    start, _ = _data_range(file, QWEIGHT)
    with open(file, "r+b") as f:
        f.seek(start + 5)
        byte = f.read(1)[0]
        f.seek(start + 5)
        f.write(bytes([byte ^ 0x10]))
    AutoModelForCausalLM.from_pretrained(folder)  # loading does not check: it loads the changed code
    capsys.readouterr()
    assert cli_main(["verify", str(folder)]) == 1
    assert capsys.readouterr().err == (f"hfquant verify: {file}: tensor {QWEIGHT} does not match its checksum "
                                       "(the file was changed after it was saved)\n")
    result = verify_checkpoint(folder)
    assert (result.status, result.file, result.tensor) == (1, str(file), QWEIGHT)


def test_zeroed_scale_in_a_shard_is_named(saved, tmp_path, capsys):
    folder = _copy(saved["sharded"], tmp_path / "ckpt")
    file = _shard_of(folder, SCALES)
    start, end = _data_range(file, SCALES)
    with open(file, "r+b") as f:
        f.seek(start)
        f.write(bytes(4))  # the first scale (float32) becomes 0
    assert cli_main(["verify", str(folder)]) == 1
    assert capsys.readouterr().err == (f"hfquant verify: {file}: tensor {SCALES} does not match its checksum "
                                       "(the file was changed after it was saved)\n")
    assert verify_checkpoint(file).tensor == SCALES  # one file on its own


def test_truncated_file_gives_one_line(saved, tmp_path, capsys):
    folder = _copy(saved["single"], tmp_path / "ckpt")
    file = folder / "model.safetensors"
    os.truncate(file, os.path.getsize(file) - 10)
    assert cli_main(["verify", str(folder)]) == 2
    assert capsys.readouterr().err == (f"hfquant verify: {file}: truncated or not a safetensors file "
                                       "(incomplete metadata, file not fully covered)\n")
    assert verify_checkpoint(folder).status == 2


def test_checkpoint_without_checksums(saved, capsys):
    file = saved["float"] / "model.safetensors"
    assert cli_main(["verify", str(saved["float"])]) == 2
    assert capsys.readouterr().err == (f"hfquant verify: {file} has no hfquant checksums (saved by another tool "
                                       "or an older hfquant): nothing to verify against\n")


def test_missing_folder(tmp_path, capsys):
    assert cli_main(["verify", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"hfquant verify: {tmp_path / 'nowhere'} does not exist\n"
    assert cli_main(["verify", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"hfquant verify: {tmp_path} holds no .safetensors file\n"
