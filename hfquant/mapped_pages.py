"""Dropping the resident pages of a tensor that lies in a mapped file (Linux).

transformers reads safetensors checkpoints through a memory map: a float weight handed to
the quantize-on-load conversion is a view of the mapped file, and every page it reads stays
in the process's resident set until the whole file is unmapped at the end of loading. Once
the weight is quantized those pages are dead weight; ``release_mapped_pages`` takes them out
of the resident set with ``madvise(MADV_DONTNEED)``.

That call is only safe where no data can be lost. On anonymous memory (the heap) it zeroes
the pages, and in a private file mapping it discards pages the process has written to
(copy-on-write copies), so that they read back from the file. It is therefore done only when

- the tensor is a dense CPU tensor whose bytes lie in one mapping of a regular file
  (``/proc/self/maps``: an inode and a path; not anonymous, not ``[heap]``, not ``/dev/``,
  not a deleted file), and
- every page of the range is either not resident or a page of the file itself, none a
  private copy and none swapped out (``/proc/self/pagemap``: flag 61 "file page or shared
  anonymous" on every present page, flag 62 "swapped" on none).

The second check is the proof that nothing is lost: dropping a page of the file only unmaps
it (it stays in the page cache), and the next read maps it again with the same bytes. It
does not rely on the mapping being read-only: torch maps safetensors files private and
writable (``UntypedStorage.from_file(shared=False)``: PROT_READ | PROT_WRITE, MAP_PRIVATE),
so a read-only condition would never hold. Nor does it rely on the cached parse of
``/proc/self/maps`` being current: should a cached file mapping have been replaced by
anonymous memory, its written pages are anonymous (refused) and its unwritten ones read as
zeros before and after.

Only the page-aligned interior of the tensor's bytes is released: the pages it shares with
the neighbouring tensors of the file stay. The caller must own the tensor: a write to it by
another thread between the check and the ``madvise`` would be lost. Elsewhere than Linux,
or where ``/proc/self/pagemap`` cannot be read, this is a no-op.

Where the loader hands over a copy instead (a load dtype other than the checkpoint's, a
weight placed on a GPU), the copy has read the mapped pages: ``release_file_range`` finds
the source bytes by file and offset (``safetensors_ranges`` reads them from the headers)
in the process's mappings of that file, and releases them under the same checks.
"""
from __future__ import annotations

import bisect
import json
import os
import struct
import sys
import threading

import torch

__all__ = ["release_file_range", "release_mapped_pages", "safetensors_ranges"]

_LINUX = sys.platform.startswith("linux")
_MAPS = "/proc/self/maps"
_PAGEMAP = "/proc/self/pagemap"
_MADV_DONTNEED = 4  # the same value on every Linux architecture
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _load_madvise():
    if not _LINUX:
        return None
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_MADVISE = _load_madvise()

# The file mappings of the process as last read: starts (sorted) and (start, end, path, file offset).
_lock = threading.Lock()
_starts: list[int] = []
_maps: list[tuple[int, int, str, int]] = []


def _read_file_mappings() -> tuple[list[int], list[tuple[int, int, str, int]]]:
    """The mappings of regular files in /proc/self/maps, sorted by start address."""
    out = []
    with open(_MAPS) as f:
        for line in f:
            # start-end perms offset dev inode path (the path may hold spaces)
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[4] == "0":
                continue  # anonymous memory
            path = fields[5].rstrip("\n")
            if not path.startswith("/") or path.startswith("/dev/") or path.endswith(" (deleted)"):
                continue  # [heap], [stack], devices and shared memory, files no longer on disk
            lo, hi = fields[0].split("-")
            out.append((int(lo, 16), int(hi, 16), path, int(fields[2], 16)))
    out.sort()
    return [m[0] for m in out], out


def _find_file_mapping(lo: int, hi: int) -> tuple[int, int, str, int] | None:
    """The file mapping holding the bytes [lo, hi), from the cached parse of /proc/self/maps,
    parsed again when the cache does not know the range (a file mapped since)."""
    global _starts, _maps
    with _lock:
        for attempt in range(2):
            i = bisect.bisect_right(_starts, lo) - 1
            if i >= 0 and _maps[i][0] <= lo and hi <= _maps[i][1]:
                return _maps[i]
            if attempt == 0:
                try:
                    _starts, _maps = _read_file_mappings()
                except OSError:
                    return None
    return None


def _pagemap(first_page: int, n: int) -> torch.Tensor | None:
    """The n 64-bit /proc/self/pagemap entries from virtual page first_page, or None."""
    want = 8 * n
    try:
        fd = os.open(_PAGEMAP, os.O_RDONLY)
    except OSError:
        return None
    buf = bytearray()
    try:
        while len(buf) < want:
            chunk = os.pread(fd, min(want - len(buf), 1 << 22), 8 * first_page + len(buf))
            if not chunk:
                return None
            buf += chunk
    except OSError:
        return None
    finally:
        os.close(fd)
    return torch.frombuffer(buf, dtype=torch.int64)


def _dense_byte_range(t: torch.Tensor) -> tuple[int, int] | None:
    """[first, last) byte address of t when its elements fill that range without gaps or overlap."""
    if t.numel() == 0:
        return None
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 1)
    if span != t.numel() or any(st == 0 for s, st in zip(t.shape, t.stride()) if s > 1):
        return None  # a strided view (other data between its elements) or an expanded one
    lo = t.data_ptr()
    return lo, lo + span * t.element_size()


def _release(lo: int, hi: int) -> int:
    """madvise(DONTNEED) on the page-aligned [lo, hi) of a file mapping, unless a page there is a
    private copy or swapped out; returns the resident bytes released."""
    entries = _pagemap(lo // _PAGE, (hi - lo) // _PAGE)
    if entries is None:
        return 0
    present = entries < 0  # bit 63
    private = present & (((entries >> 61) & 1) == 0)  # present, not a page of a file (a copy-on-write copy)
    swapped = ((entries >> 62) & 1) == 1  # only anonymous pages are swapped out
    if bool((private | swapped).any()):
        return 0
    resident = int(present.sum()) * _PAGE
    if resident == 0:
        return 0
    if _MADVISE(lo, hi - lo, _MADV_DONTNEED) != 0:
        return 0  # EINVAL for locked or huge-page mappings: nothing changed
    return resident


def release_mapped_pages(t: torch.Tensor) -> int:
    """Takes the pages of t out of the resident set when t lies in a mapped file and no data
    can be lost (see the module docstring); returns the bytes that were resident and are
    released, 0 when nothing was done. t stays valid: reading it maps the pages again."""
    if _MADVISE is None or not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.layout != torch.strided:
        return 0
    rng = _dense_byte_range(t)
    if rng is None:
        return 0
    lo = -(-rng[0] // _PAGE) * _PAGE  # the whole pages inside the tensor's bytes
    hi = rng[1] // _PAGE * _PAGE
    if hi <= lo or _find_file_mapping(lo, hi) is None:
        return 0
    return _release(lo, hi)


def safetensors_ranges(files) -> dict[str, tuple[str, int, int]]:
    """{tensor name: (real path of its file, first byte, end byte)} from the headers of the
    safetensors files (JSON after an 8-byte length; offsets count from the header's end).
    Files that cannot be read or are not safetensors are left out."""
    out: dict[str, tuple[str, int, int]] = {}
    for f in files or ():
        path = os.path.realpath(os.fspath(f))
        if not path.endswith(".safetensors"):
            continue
        try:
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100 << 20:  # safetensors' own limit on the header
                    continue
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            continue
        if not isinstance(header, dict):
            continue
        for name, info in header.items():
            off = info.get("data_offsets") if isinstance(info, dict) else None
            if name != "__metadata__" and isinstance(off, list) and len(off) == 2 and all(
                    isinstance(x, int) and x >= 0 for x in off) and off[0] <= off[1]:
                out[name] = (path, 8 + n + off[0], 8 + n + off[1])
    return out


def release_file_range(path: str, begin: int, end: int) -> int:
    """Takes the pages holding bytes [begin, end) of the file at path (a real path) out of the
    resident set, in every mapping of that file in this process, under the checks of
    ``release_mapped_pages`` (whole pages only, none a private copy); returns the bytes released."""
    if _MADVISE is None or end <= begin:
        return 0
    try:
        _, maps = _read_file_mappings()  # fresh: the file's mappings are looked up by name
    except OSError:
        return 0
    released = 0
    for start, stop, mpath, offset in maps:
        if mpath != path:
            continue
        # file byte b is at address start + b - offset (both page-aligned, as mmap requires)
        lo = max(start, start + begin - offset)
        hi = min(stop, start + end - offset)
        lo = -(-lo // _PAGE) * _PAGE
        hi = hi // _PAGE * _PAGE
        if hi > lo:
            released += _release(lo, hi)
    return released
