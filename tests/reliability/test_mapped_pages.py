"""release_mapped_pages (hfquant/mapped_pages.py): the pages of a tensor that lies in a mapped
checkpoint file leave the resident set and read back unchanged; anonymous memory, the heap,
private copies of file pages and strided views are refused with their data untouched.

Residency is read here independently of the module: the present bit of /proc/self/pagemap
for each page, and RssFile of /proc/self/status."""
from __future__ import annotations

import mmap
import os
import shutil
import struct
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hfquant import mapped_pages
from hfquant.mapped_pages import release_mapped_pages

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.access("/proc/self/pagemap", os.R_OK),
    reason="page release is Linux-only (/proc/self/pagemap)")

PAGE = mmap.PAGESIZE
MiB = 1 << 20


def _interior(t: torch.Tensor) -> tuple[int, int]:
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    return -(-lo // PAGE) * PAGE, hi // PAGE * PAGE


def resident_pages(t: torch.Tensor) -> int:
    """How many whole pages of t's bytes are mapped in this process (pagemap bit 63)."""
    lo, hi = _interior(t)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(lo // PAGE * 8)
        data = f.read((hi - lo) // PAGE * 8)
    return sum(e >> 63 for e in struct.unpack(f"{len(data) // 8}Q", data))


def whole_pages(t: torch.Tensor) -> int:
    lo, hi = _interior(t)
    return (hi - lo) // PAGE


def rss_file() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.fixture
def checkpoint(tmp_path):
    """A safetensors file: a 16 MiB bf16 weight between two small tensors, and the originals."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"a.bias": torch.randn(5, generator=gen).to(torch.bfloat16),
               "b.weight": torch.randn(4096, 2048, generator=gen).to(torch.bfloat16),
               "c.weight": torch.randn(1000, 3, generator=gen)}
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


def test_mapped_checkpoint_pages_leave_rss_and_read_back(checkpoint):
    path, ref = checkpoint
    # as transformers' loader reads a tensor: a slice of the open file, materialised with [...]
    with safe_open(path, framework="pt") as f:
        w = f.get_slice("b.weight")[...]
        small = f.get_slice("c.weight")[...]
        assert torch.equal(w, ref["b.weight"]) and torch.equal(small, ref["c.weight"])  # reads every page
        n = whole_pages(w)
        assert resident_pages(w) == n > 4000
        before = rss_file()
        released = release_mapped_pages(w)
        assert released == n * PAGE
        assert resident_pages(w) == 0
        # RssFile is the kernel's per-CPU batched counter: approximate by a few MiB
        assert before - rss_file() >= 0.6 * released
        # the data reads back from the file, bit for bit, and is resident again
        assert torch.equal(w, ref["b.weight"])
        assert resident_pages(w) == n
        assert torch.equal(small, ref["c.weight"])
        release_mapped_pages(w)
        assert release_mapped_pages(w) == 0  # nothing resident is left to release
        assert torch.equal(w.t().contiguous(), ref["b.weight"].t().contiguous())


def test_transposed_view_of_mapped_weight_is_released(checkpoint):
    path, ref = checkpoint
    with safe_open(path, framework="pt") as f:
        w = f.get_slice("b.weight")[...]
        assert torch.equal(w, ref["b.weight"])
        assert release_mapped_pages(w.t()) == whole_pages(w) * PAGE  # the same bytes, dense
        assert torch.equal(w.t(), ref["b.weight"].t())


@pytest.mark.parametrize("numel", [3000, 4 * MiB], ids=["small-brk-heap", "large-mmap-heap"])
def test_heap_tensor_is_refused(numel):
    t = torch.arange(numel, dtype=torch.int32)
    expect = t.clone()
    pages = resident_pages(t)
    assert release_mapped_pages(t) == 0
    assert resident_pages(t) == pages
    assert torch.equal(t, expect)


def test_anonymous_mapping_is_refused():
    m = mmap.mmap(-1, 8 * MiB)
    t = torch.frombuffer(m, dtype=torch.uint8)
    t.copy_(torch.arange(t.numel(), dtype=torch.int64).remainder(251).to(torch.uint8))
    expect = t.clone()
    assert resident_pages(t) == whole_pages(t)
    assert release_mapped_pages(t) == 0
    assert resident_pages(t) == whole_pages(t)
    assert torch.equal(t, expect)
    del t
    m.close()


def _file_tensor(path: str, shared: bool) -> torch.Tensor:
    nbytes = os.path.getsize(path)
    storage = torch.UntypedStorage.from_file(path, shared=shared, nbytes=nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def test_private_copy_of_a_file_page_is_refused(checkpoint):
    path, _ = checkpoint
    t = _file_tensor(path, shared=False)  # MAP_PRIVATE, writable: what safetensors gets from torch
    on_disk = t.clone()
    mid = t.numel() // 2 // PAGE * PAGE + 100
    t[mid] = on_disk[mid] ^ 0xFF  # a copy-on-write page, the only copy of this byte
    assert release_mapped_pages(t) == 0
    assert t[mid] == on_disk[mid] ^ 0xFF
    assert torch.equal(t[:mid], on_disk[:mid]) and torch.equal(t[mid + 1:], on_disk[mid + 1:])
    # the pages before the written one hold no private data: those may go
    head = t[: mid // PAGE * PAGE]
    assert release_mapped_pages(head) == whole_pages(head) * PAGE
    assert resident_pages(head) == 0
    assert torch.equal(head, on_disk[: head.numel()])
    assert t[mid] == on_disk[mid] ^ 0xFF


def test_shared_mapping_keeps_writes(checkpoint, tmp_path):
    path, _ = checkpoint
    copy = str(tmp_path / "copy.safetensors")
    shutil.copy(path, copy)
    t = _file_tensor(copy, shared=True)  # MAP_SHARED: a write goes to the file's own page
    t[4 * PAGE + 1] ^= 0x5A
    expect = t.clone()
    assert release_mapped_pages(t) > 0
    assert resident_pages(t) == 0
    assert torch.equal(t, expect)


def test_strided_small_empty_and_meta_are_refused(checkpoint):
    path, ref = checkpoint
    with safe_open(path, framework="pt") as f:
        w = f.get_slice("b.weight")[...]
        assert torch.equal(w, ref["b.weight"])
        n = resident_pages(w)
        assert release_mapped_pages(w[:, ::2]) == 0  # its range holds the other columns too
        assert release_mapped_pages(w[:, :1].expand(4096, 8)) == 0
        assert release_mapped_pages(w[0, :100]) == 0  # within one page: shared with the rest
        assert release_mapped_pages(w[:0]) == 0
        assert resident_pages(w) == n
    assert release_mapped_pages(torch.empty(4096, 4096, device="meta")) == 0


def test_stale_maps_cache_cannot_release_heap(monkeypatch):
    # should the cached parse of /proc/self/maps call heap memory a file mapping, the
    # pagemap check still sees anonymous pages and refuses
    t = torch.arange(4 * MiB, dtype=torch.int32)
    expect = t.clone()
    lo, hi = _interior(t)
    monkeypatch.setattr(mapped_pages, "_starts", [lo - PAGE])
    monkeypatch.setattr(mapped_pages, "_maps", [(lo - PAGE, hi + PAGE, "/a/stale/file.safetensors", 0)])
    assert release_mapped_pages(t) == 0
    assert resident_pages(t) == whole_pages(t)
    assert torch.equal(t, expect)


def test_without_pagemap_or_madvise_nothing_is_released(checkpoint, monkeypatch):
    path, ref = checkpoint
    with safe_open(path, framework="pt") as f:
        w = f.get_slice("b.weight")[...]
        assert torch.equal(w, ref["b.weight"])
        monkeypatch.setattr(mapped_pages, "_PAGEMAP", "/proc/self/no-such-file")
        assert release_mapped_pages(w) == 0
        monkeypatch.undo()
        monkeypatch.setattr(mapped_pages, "_MADVISE", None)  # what other systems get
        assert release_mapped_pages(w) == 0
        assert resident_pages(w) == whole_pages(w)


def test_file_range_release_reaches_a_copied_weight(checkpoint, tmp_path):
    """The loader's copy case: the tensor handed over is a cast copy on the heap, its source
    bytes are found through the safetensors header and released in the file's mapping."""
    path, ref = checkpoint
    ranges = mapped_pages.safetensors_ranges([path, str(tmp_path / "missing.safetensors")])
    assert set(ranges) == set(ref)
    raw = open(path, "rb").read()
    for name, t in ref.items():
        real, begin, end = ranges[name]
        assert real == os.path.realpath(path)
        assert raw[begin:end] == t.contiguous().view(torch.uint8).numpy().tobytes()
    with safe_open(path, framework="pt") as f:
        view = f.get_slice("b.weight")[...]
        copy = view.to(torch.float32)  # reads every page of the mapping
        assert release_mapped_pages(copy) == 0  # heap memory
        assert resident_pages(view) == whole_pages(view)
        assert mapped_pages.release_file_range(*ranges["b.weight"]) == whole_pages(view) * PAGE
        assert resident_pages(view) == 0
        assert torch.equal(view, ref["b.weight"])
        assert mapped_pages.release_file_range(os.path.realpath(path) + ".other", 0, 1 << 30) == 0


@pytest.mark.parametrize("header", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json",
                                    b"\x04\x00\x00\x00\x00\x00\x00\x00[1,2]",
                                    b"\x2a\x00\x00\x00\x00\x00\x00\x00" + b'{"w":{"data_offsets":[9,3]}}'.ljust(42)],
                         ids=["empty", "not-json", "not-a-dict", "reversed-offsets"])
def test_unreadable_headers_give_no_ranges(tmp_path, header):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(header)
    assert mapped_pages.safetensors_ranges([bad]) == {}


@pytest.fixture
def tiny_bf16_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["view", "cast-copy"])
def test_quantize_on_load_releases_the_mapped_float_weights(tiny_bf16_llama, monkeypatch, dtype):
    """transformers 5 hands the conversion a view of the mapped checkpoint when the load dtype
    is the checkpoint's (bf16 here), and a cast copy on the heap otherwise; either way every
    quantized weight's pages of the mapping are released."""
    from transformers import AutoModelForCausalLM

    import hfquant
    from hfquant import quantizer

    calls = []
    release_source = quantizer.HfQuantQuantize._release_source

    def spy(self, value, source_patterns):
        released = release_source(self, value, source_patterns)
        calls.append((value.dtype, source_patterns[0], released))
        return released

    monkeypatch.setattr(quantizer.HfQuantQuantize, "_release_source", spy)
    kw = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(tiny_bf16_llama, quantization_config=hfquant.HfQuantConfig(bits=4),
                                                 **kw)
    ranges = mapped_pages.safetensors_ranges(tiny_bf16_llama.glob("*.safetensors"))
    assert len(calls) == 2 * 7 + 1  # every projection of both layers, and the embedding (8 bits by default)
    for value_dtype, key, released in calls:
        assert value_dtype == (dtype or torch.bfloat16)
        _, begin, end = ranges[key]
        assert released >= (end - begin) - 2 * PAGE, (key, released)
    # the same model without the release: identical (each weight is released after it was quantized)
    monkeypatch.setattr(quantizer.HfQuantQuantize, "_release_source", lambda self, value, source_patterns: 0)
    ref = AutoModelForCausalLM.from_pretrained(tiny_bf16_llama, quantization_config=hfquant.HfQuantConfig(bits=4), **kw)
    x = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
