"""Locating the default model and text, and converting the bundled GGUF once to a cache."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MODEL_SUBDIR = "smollm2-135m-instruct-q4_1"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def data_dir() -> Path:
    """The shared data folder: $HFQUANT_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("HFQUANT_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent.parent
    candidates += [here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    # a clone of a local checkout: the data beside the checkout it was cloned from
    origin = _local_origin(here)
    if origin is not None:
        candidates.append(origin.parent / "shared" / "data")
    for c in candidates:
        if (c / MODEL_SUBDIR).is_dir():
            return c
    raise FileNotFoundError(
        "hfquant: the default model and text were not found; set HFQUANT_DATA to a folder holding "
        f"{MODEL_SUBDIR}/ and wikitext-2/ (looked in: {', '.join(map(str, candidates))})"
    )


def _local_origin(repo: Path) -> Path | None:
    try:
        url = subprocess.run(["git", "-C", str(repo), "remote", "get-url", "origin"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    url = url.removeprefix("file://")
    return Path(url).resolve() if url and os.path.isdir(url) else None


def cache_dir() -> Path:
    d = Path(os.environ.get("HFQUANT_CACHE", Path(__file__).resolve().parent.parent / ".cache"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def default_model_dir(dtype: str = "float32") -> Path:
    """A plain safetensors checkpoint of the default model, converted from the GGUF once."""
    out = cache_dir() / f"smollm2-135m-{dtype}"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    src = data_dir() / MODEL_SUBDIR
    tmp = out.with_name(out.name + ".tmp")
    subprocess.run([sys.executable, str(src / "convert_to_hf.py"), str(tmp), dtype], check=True,
                   stdout=subprocess.DEVNULL)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def wikitext_test() -> str:
    """WikiText-2 raw test split, line ends normalised."""
    return (data_dir() / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")


def wikitext_valid() -> str:
    return (data_dir() / "wikitext-2" / "wiki.valid.tokens").read_text(encoding="utf-8").replace("\r\n", "\n")
