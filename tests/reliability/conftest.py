"""Real quantized checkpoints to break: a 2-layer slice of the default model (SmolLM2-135M,
its first two decoder layers and the first 1024 rows of its embedding), saved by hfquant
for each storage scheme."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import hfquant
from ckpt_tools import edit_config, read_tensors

SLICE_LAYERS = 2
SLICE_VOCAB = 1024

# name -> HfQuantConfig arguments; "gptq" is derived from "w4g128" (see _as_act_order). The
# embedding stays float in the 4-bit schemes (below 8 bits the default quantizes it at 8): the
# breakages below name the first linear layer; quantized embeddings' checkpoints are broken in
# tests/nn/test_quant_embedding.py
SCHEMES = {
    # the version 1 grid: "gptq" is derived from it (GPTQ's layers use that grid, whose scales
    # are never negative); the default grid's checkpoints are tested in tests/formats
    "w4g128": dict(bits=4, group_size=128, grid="range", quantize_embeddings=False),
    "w4g128a": dict(bits=4, group_size=128, symmetric=False, quantize_embeddings=False),
    "w8": dict(bits=8, group_size=-1),
    "kmeans": dict(method="kmeans", bits=4, kmeans_max_iter=8),
    "llm_int8": dict(method="llm_int8"),
}


@pytest.fixture(scope="session")
def slice_dir(model_dir, tmp_path_factory):
    """The float32 slice, saved as a plain transformers checkpoint."""
    out = tmp_path_factory.mktemp("slice") / "float"
    model = AutoModelForCausalLM.from_pretrained(model_dir, num_hidden_layers=SLICE_LAYERS)
    model.resize_token_embeddings(SLICE_VOCAB)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def checkpoints(slice_dir, tmp_path_factory):
    """{scheme: directory of a quantized checkpoint of the slice}, plus "gptq" (act-order
    permutations) and "sharded" (w4g128 in shards of at most 1 MB)."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for name, kw in SCHEMES.items():
        model = AutoModelForCausalLM.from_pretrained(slice_dir, quantization_config=hfquant.HfQuantConfig(**kw))
        out[name] = str(root / name)
        model.save_pretrained(out[name])
        if name == "w4g128":
            out["sharded"] = str(root / "sharded")
            model.save_pretrained(out["sharded"], max_shard_size="1MB")
    out["gptq"] = str(root / "gptq")
    _as_act_order(out["w4g128"], out["gptq"])
    return out


def _as_act_order(src: str, dst: str) -> None:
    """A GPTQ act-order checkpoint made from a RTN one: each layer's columns stored in
    reverse order within each group of 128 (perm), so it stands for the same weights."""
    import shutil

    from hfquant.formats import pack_int4, unpack_int4

    shutil.copytree(src, dst)
    f = os.path.join(dst, "model.safetensors")
    sd = read_tensors(f)
    for key in [k for k in sd if k.endswith(".qweight")]:
        prefix = key[: -len("qweight")]
        codes = unpack_int4(sd[key], sd[key].shape[1] * 2)
        K = codes.shape[1]
        j = torch.arange(K)
        start = j // 128 * 128
        end = torch.clamp(start + 128, max=K)  # the last group may be shorter
        perm = (start + end - 1 - j).to(torch.int32)
        sd[key] = pack_int4(codes[:, perm.long()]).contiguous()
        sd[prefix + "perm"] = perm
    save_file(sd, f, metadata={"format": "pt"})
    edit_config(dst, method="gptq", act_order=True)
