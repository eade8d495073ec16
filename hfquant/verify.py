"""Per-tensor checksums: written into the safetensors metadata at save, checked by `hfquant verify`.

Save stores ``hfquant_checksum_algorithm`` ("crc32") and ``hfquant_checksums`` (a JSON
object {tensor name: 8 hex digits}) in the metadata of every weight file; a sharded save
gives every shard the same object, which covers all tensors. The checksum is zlib's CRC-32
of the tensor's bytes as the file stores them (contiguous, little-endian): it catches every
single flipped byte and runs at a few GB/s. Loading does not check it; ``verify_checkpoint``
does, reading the files through a read-only memory map (no pickle, no copy).
"""
from __future__ import annotations

import dataclasses
import json
import mmap
import os
import zlib

ALGORITHM = "crc32"
ALGORITHM_KEY = "hfquant_checksum_algorithm"
CHECKSUMS_KEY = "hfquant_checksums"


def _crc(buf) -> str:
    return f"{zlib.crc32(buf) & 0xFFFFFFFF:08x}"


def tensor_checksum(tensor) -> str:
    """The checksum of a tensor's bytes as safetensors stores them."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return _crc(b"")
    import torch

    return _crc(t.view(torch.uint8).numpy())


def checksum_metadata(state_dict) -> dict[str, str]:
    """The metadata entries that record the checksum of every tensor of ``state_dict``
    (tensors on the meta device, offloaded ones, are left out)."""
    sums = {name: tensor_checksum(t) for name, t in state_dict.items() if t.device.type != "meta"}
    return {ALGORITHM_KEY: ALGORITHM, CHECKSUMS_KEY: json.dumps(sums, sort_keys=True, separators=(",", ":"))}


@dataclasses.dataclass
class VerifyResult:
    """What verify_checkpoint found. ``status``: 0 every tensor matches its checksum, 1 a
    tensor does not (``file``, ``tensor`` name it), 2 nothing to verify against (no
    checksums) or a file that cannot be read (``file`` names it). ``message``: one line."""

    status: int
    message: str
    files: int = 0
    tensors: int = 0
    unchecked: list[str] = dataclasses.field(default_factory=list)
    file: str | None = None
    tensor: str | None = None

    def __bool__(self) -> bool:
        return self.status == 0


def _weight_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"hfquant: {path} does not exist")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index) and not os.path.isfile(os.path.join(path, "model.safetensors")):
        try:
            with open(index, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"hfquant: {index} is not a valid weight index ({exc})") from None
    else:
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"hfquant: {path} holds no .safetensors file")
    return [os.path.join(path, n) for n in names]


def _header(file: str) -> tuple[dict, int]:
    """The parsed header of a safetensors file (checked by safetensors itself against the
    file's size) and where its data starts."""
    from safetensors import safe_open

    with safe_open(file, framework="numpy"):
        pass
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def _check_file(file: str, result: VerifyResult) -> VerifyResult | None:
    """Checks one file into ``result``; returns a final result on a mismatch or an error."""
    try:
        header, start = _header(file)
    except Exception as exc:  # safetensors raises its own error type
        reason = str(exc).removeprefix("Error while deserializing header: ")
        return VerifyResult(2, f"hfquant verify: {file}: truncated or not a safetensors file ({reason})", file=file)
    meta = header.pop("__metadata__", None) or {}
    if CHECKSUMS_KEY not in meta:
        return VerifyResult(2, f"hfquant verify: {file} has no hfquant checksums (saved by another tool or an "
                               "older hfquant): nothing to verify against", file=file)
    if meta.get(ALGORITHM_KEY, ALGORITHM) != ALGORITHM:
        return VerifyResult(2, f"hfquant verify: {file}: unknown checksum algorithm {meta[ALGORITHM_KEY]!r}",
                            file=file)
    try:
        sums = json.loads(meta[CHECKSUMS_KEY])
        if not isinstance(sums, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        return VerifyResult(2, f"hfquant verify: {file}: its checksum metadata is corrupt ({exc})", file=file)
    order = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            for name, info in order:
                if name not in sums:
                    result.unchecked.append(name)
                    continue
                b, e = info["data_offsets"]
                if _crc(view[start + b:start + e]) != sums[name]:
                    return VerifyResult(1, f"hfquant verify: {file}: tensor {name} does not match its checksum "
                                           "(the file was changed after it was saved)", file=file, tensor=name)
                result.tensors += 1
        finally:
            view.release()
    result.files += 1
    return None


def verify_checkpoint(path: str | os.PathLike) -> VerifyResult:
    """Recomputes the checksum of every tensor in the safetensors files of ``path`` (a
    checkpoint folder, or one .safetensors file) and compares it with the one save wrote.
    Stops at the first tensor that differs. Raises FileNotFoundError where there is no file."""
    path = os.fspath(path)
    files = _weight_files(path)
    result = VerifyResult(0, "")
    for file in files:
        failed = _check_file(file, result)
        if failed is not None:
            failed.files, failed.tensors, failed.unchecked = result.files, result.tensors, result.unchecked
            return failed
    noun = "file" if result.files == 1 else "files"
    result.message = f"ok: {result.tensors} tensors in {result.files} {noun}"
    if result.unchecked:
        result.message += (f" ({len(result.unchecked)} without a checksum: "
                           f"{', '.join(result.unchecked[:3])}{', ...' if len(result.unchecked) > 3 else ''})")
    return result
