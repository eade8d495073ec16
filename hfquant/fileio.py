"""Atomic output directories and the files that travel beside a checkpoint."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

# tokenizer, chat template, generation settings: copied as they are
_SKIP = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth")


def copy_side_files(src: str, dst: str) -> None:
    """Copies the plain files of ``src`` except weights and config.json into ``dst``."""
    for entry in os.listdir(src):
        path = os.path.join(src, entry)
        if os.path.isfile(path) and entry != "config.json" and not entry.endswith(_SKIP):
            shutil.copy2(path, os.path.join(dst, entry))


@contextlib.contextmanager
def atomic_dir(final: str):
    """Yields a temporary sibling directory of ``final``; on success it replaces ``final``
    (an existing directory is moved aside first, then removed), on failure it is removed."""
    final = os.path.abspath(os.fspath(final))
    if os.path.isfile(final):
        raise ValueError(f"hfquant: output {final} is a file, not a directory")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        old = None
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=os.path.basename(final) + ".old-", dir=parent)
            os.rmdir(old)
            os.rename(final, old)
        os.rename(tmp, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
