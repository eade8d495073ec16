"""The checkpoint parser under random byte mutations: a real hfquant checkpoint (a small
Llama quantized with each storage scheme) has bytes flipped, overwritten, inserted, cut,
in its safetensors header, its data or its config.json. Loading must then either raise a
clean error (ValueError, OSError, safetensors' error, or a RuntimeError of transformers
naming the problem) or load exactly the tensors the mutated file holds; never crash, hang,
or raise an internal error (IndexError, KeyError, TypeError, AttributeError, ...).

Budget as test_fuzz_ops.py: HFQUANT_FUZZ=quick (default) or nightly.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hfquant
from ckpt_tools import read_tensors

_HC = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
settings.register_profile("ckpt-quick", max_examples=40, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_HC, print_blob=True)
settings.register_profile("ckpt-nightly", max_examples=3000, deadline=None, database=None,
                          suppress_health_check=_HC, print_blob=True)
PROFILE = os.environ.get("HFQUANT_FUZZ", "quick")
FUZZ = settings.get_profile(f"ckpt-{PROFILE}")
if os.environ.get("HFQUANT_FUZZ_EXAMPLES"):  # an explicit budget (cases per test)
    FUZZ = settings(FUZZ, max_examples=int(os.environ["HFQUANT_FUZZ_EXAMPLES"]))
OUTCOMES: Counter = Counter()
CLEAN = (ValueError, OSError, SafetensorError)
SCHEMES = {"w4g32a": dict(bits=4, group_size=32, symmetric=False), "w8": dict(bits=8, group_size=-1),
           "kmeans": dict(method="kmeans", bits=3, group_size=32, kmeans_max_iter=4)}


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("fuzzckpt")
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(root / "float")
    out = {}
    for name, kw in SCHEMES.items():
        m = AutoModelForCausalLM.from_pretrained(root / "float", quantization_config=hfquant.HfQuantConfig(**kw))
        m.save_pretrained(root / name)
        out[name] = str(root / name)
    yield out
    path = os.environ.get("HFQUANT_FUZZ_REPORT")
    if path:
        old = json.load(open(path)) if os.path.exists(path) else {}
        old["checkpoint_parser"] = dict(OUTCOMES)
        with open(path, "w") as fh:
            json.dump(old, fh, indent=1, sort_keys=True)


def _header_len(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


@st.composite
def mutations(draw):
    """(file, list of edits); an edit is (kind, position in [0, 1), payload)."""
    target = draw(st.sampled_from(["header", "header", "data", "config", "length"]))
    n = draw(st.integers(1, 4))
    edits = [(draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"])),
              draw(st.floats(0, 1, exclude_max=True)),
              draw(st.binary(min_size=1, max_size=8))) for _ in range(n)]
    return target, edits


def _apply(raw: bytes, lo: int, hi: int, edits) -> bytes:
    b = bytearray(raw)
    for kind, pos, payload in edits:
        hi = min(hi, len(b))
        if hi <= lo:
            break
        i = lo + int(pos * (hi - lo))
        if kind == "flip":
            b[i] ^= payload[0] or 0x01
        elif kind == "set":
            b[i:i + len(payload)] = payload
        elif kind == "insert":
            b[i:i] = payload
        elif kind == "delete":
            del b[i:i + len(payload)]
        else:
            del b[i:]
    return bytes(b)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal, NaN included: same shape and dtype, NaN at the same positions, every
    other element equal (a mutated float may well be a NaN, which equals nothing)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not b.is_floating_point():
        return torch.equal(a, b)
    nan = b.isnan()
    return torch.equal(a.isnan(), nan) and torch.equal(a[~nan], b[~nan])


def _raised_in_config_parsing(e: BaseException) -> bool:
    """Whether the exception came out of transformers' configuration code."""
    import traceback

    files = [f.filename.replace(os.sep, "/") for f in traceback.extract_tb(e.__traceback__)]
    return any("/transformers/" in f and ("configuration_" in f.rsplit("/", 1)[-1]) for f in files)


@FUZZ
@given(scheme=st.sampled_from(sorted(SCHEMES)), mutation=mutations())
# found by the nightly run: a flipped bit in config.json's "dtype" ("floau32"), refused by
# transformers' config parsing with an AttributeError naming the value
@example(scheme="kmeans", mutation=("config", [("flip", 0.13671875, b"\x00")]))
def test_fuzz_checkpoint_bytes(tiny_checkpoints, tmp_path_factory, scheme, mutation):
    target, edits = mutation
    d = tmp_path_factory.mktemp("m")
    shutil.rmtree(d)
    shutil.copytree(tiny_checkpoints[scheme], d)
    st_file = os.path.join(d, "model.safetensors")
    if target == "config":
        f = os.path.join(d, "config.json")
        raw = open(f, "rb").read()
        lo, hi = 0, len(raw)
    else:
        f = st_file
        raw = open(f, "rb").read()
        n = _header_len(raw)
        lo, hi = {"header": (8, n), "data": (n, len(raw)), "length": (0, 8)}[target]
    new = _apply(raw, lo, hi, edits)
    with open(f, "wb") as fh:
        fh.write(new)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        model = AutoModelForCausalLM.from_pretrained(d)
    except CLEAN as e:
        OUTCOMES[f"refused:{type(e).__name__}"] += 1
        return
    except RuntimeError as e:
        # transformers' own size-mismatch report, or a kernel's argument check
        assert "ignore_mismatched_sizes" in str(e) or "hfquant" in str(e), repr(e)
        OUTCOMES["refused:RuntimeError"] += 1
        return
    except (AttributeError, TypeError, KeyError) as e:
        # a mutated config.json whose fields transformers' own config classes refuse while
        # parsing them (e.g. "dtype": "floau32" -> no attribute 'floau32'), before hfquant runs
        assert target == "config" and _raised_in_config_parsing(e), repr(e)
        OUTCOMES[f"refused:{type(e).__name__}(config parsing)"] += 1
        return
    # it loaded: it holds exactly what the (mutated) file says, and it runs
    OUTCOMES["loaded" if new != raw else "loaded:unchanged"] += 1
    sd = model.state_dict()
    for k, v in read_tensors(st_file).items():
        if k in sd:
            assert _same_values(sd[k].to(v.dtype) if sd[k].dtype != v.dtype else sd[k], v), k
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))


def test_same_values_tells_floats_apart():
    # the check above must fail for two float tensors that differ anywhere, NaN or not
    a = torch.tensor([1.0, float("nan"), 3.0])
    assert _same_values(a, a.clone())
    assert not _same_values(a, torch.tensor([1.0, float("nan"), 3.5]))
    assert not _same_values(a, torch.tensor([1.0, 2.0, 3.0]))
    assert not _same_values(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0], dtype=torch.float16))
    assert not _same_values(torch.tensor([1, 2]), torch.tensor([1, 3]))
