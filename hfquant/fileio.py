"""Saving into a folder without losing what else it holds, and the files that travel beside a checkpoint.

``atomic_dir(final)`` yields a staging folder, a hidden sibling of ``final`` named
``.<name>.hfquant-save-<pid>-<rand>-<inode>``, and the caller writes the new checkpoint into
it. Then:

1. Mirror: every entry of ``final`` that the new save does not write is put into the staging
   folder as well: files as hard links, symlinks as symlinks, sub-folders recreated (mode and
   times copied). Weight files of an older checkpoint that the new one does not write
   (``model*.safetensors`` shards and their index, of the variant written) are left out, as
   transformers removes them too.
2. Swap: renameat2(RENAME_EXCHANGE) (renamex_np(RENAME_SWAP) on macOS) exchanges the two
   folders in one step. ``final`` now holds the new checkpoint beside the same user files
   (same inodes); the staging name holds the old folder.
3. Clear the old folder: an entry goes only where ``final`` holds an entry of the same name
   (the same file through another link, or its replacement) or where it is a stale weight
   file. Anything else (a file another process created meanwhile, a fifo) is moved back
   into ``final``; what cannot be moved back is kept there, with a warning.

``final`` keeps its permission bits. A kill at any point leaves ``final`` as the old
folder (before the swap) or the new one (after it): config and weights switch together.
The next save into ``final`` finishes what a dead process left (a process of this machine:
the pid is checked; folders of a live process are left alone): the inode in a staging name
says which side of the swap the folder is on. Still the staging folder: it holds only the
new save's files and links to files ``final`` still has; it is removed (a file in its
sub-folders that ``final`` lost meanwhile is moved back). The old folder: step 3.

Where the file system refuses hard links or the exchange, files move one by one: the
staging folder is marked complete (``.hfquant-complete``, which lists the moves), the
replaced files of ``final`` move to ``.<name>.hfquant-old-<pid>-<rand>``, the new ones
move in, then step 3. A kill between the first and the last move leaves ``final`` without
a whole checkpoint until the next save into it, which completes the moves (the new files
are whole) before it starts.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile

logger = logging.getLogger("hfquant")

# tokenizer, chat template, generation settings: copied as they are
_SKIP = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth")


def copy_side_files(src: str, dst: str) -> None:
    """Copies the plain files of ``src`` except weights and config.json into ``dst``."""
    for entry in os.listdir(src):
        path = os.path.join(src, entry)
        if os.path.isfile(path) and entry != "config.json" and not entry.endswith(_SKIP):
            shutil.copy2(path, os.path.join(dst, entry))


_COMPLETE = ".hfquant-complete"  # in a staging folder: its files are whole (the fallback's roll-forward mark)
_WEIGHTS = re.compile(r"model(?:\.(?P<v1>[^.\-]+))?(?:-\d{5}-of-\d{5})?\.safetensors"
                      r"|model\.safetensors\.index(?:\.(?P<v2>[^.]+))?\.json")
# errno values that mean "not here" for a hard link or an exchange: use the fallback
_UNSUPPORTED = {errno.EPERM, errno.EACCES, errno.EXDEV, errno.EMLINK, errno.EINVAL, errno.ENOSYS,
                errno.ENOTSUP, errno.EOPNOTSUPP}
_AT_FDCWD = -100
_libc = None
_ACTIVE: set[tuple[str, str]] = set()  # (pid, rand) of the saves running in this process


class _Fallback(Exception):
    pass


def _weight_variant(name: str) -> str | None:
    """The variant of a weight file or index name ("" for none), None for other names."""
    m = _WEIGHTS.fullmatch(name)
    return None if m is None else (m["v1"] or m["v2"] or "")


def _rename2(src: str, dst: str, flags: int) -> None:
    """renameat2 with RENAME_NOREPLACE (1) or RENAME_EXCHANGE (2); OSError(ENOSYS) without it."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _libc = False
    fn = getattr(_libc, "renameat2", None) if _libc else None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), src, None, dst)
        return
    fn = getattr(_libc, "renamex_np", None) if _libc and sys.platform == "darwin" else None
    if fn is not None:
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        if fn(os.fsencode(src), os.fsencode(dst), {1: 0x4, 2: 0x2}[flags]) != 0:  # RENAME_EXCL, RENAME_SWAP
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), src, None, dst)
        return
    raise OSError(errno.ENOSYS, "renameat2 is not available", src, None, dst)


def _exchange(a: str, b: str) -> None:
    """Swaps two paths in one step."""
    _rename2(a, b, 2)


def _rename_noreplace(src: str, dst: str) -> None:
    """Renames ``src`` to ``dst`` unless ``dst`` exists (FileExistsError)."""
    try:
        _rename2(src, dst, 1)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
        os.rename(src, dst)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _entries(path: str) -> list:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _files(root: str, rel: str = "") -> list[str]:
    """Relative paths of the regular files under ``root`` (symlinks not followed)."""
    out = []
    for e in _entries(os.path.join(root, rel)):
        r = os.path.join(rel, e.name)
        if e.is_dir(follow_symlinks=False):
            out += _files(root, r)
        elif e.is_file(follow_symlinks=False):
            out.append(r)
    return out


def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # a file system without fsync on folders
    finally:
        os.close(fd)


def _mirror(src: str, dst: str, stale: set[str], made: list[str], rel: str = "") -> None:
    """Puts every entry of ``src`` that ``dst`` lacks into ``dst`` (hard links, symlinks,
    recreated folders), except the top-level names in ``stale``; ``made`` lists what it made."""
    try:
        entries = _entries(src)
    except PermissionError as exc:
        raise _Fallback(exc) from exc
    for e in entries:
        r = os.path.join(rel, e.name)
        d = os.path.join(dst, e.name)
        is_dir = e.is_dir(follow_symlinks=False)
        if os.path.lexists(d):  # the new save wrote this name
            if is_dir and os.path.isdir(d) and not os.path.islink(d):
                _mirror(e.path, d, stale, made, r)
            elif is_dir:
                raise ValueError(f"hfquant: the save writes {r}, but {e.path} is a folder; move it away first")
            continue
        if not rel and e.name in stale:
            continue
        try:
            if e.is_symlink():
                os.symlink(os.readlink(e.path), d)
                made.append(d)
            elif is_dir:
                os.mkdir(d)
                made.append(d)
                _mirror(e.path, d, stale, made, r)
                shutil.copystat(e.path, d, follow_symlinks=False)
            elif e.is_file(follow_symlinks=False):
                os.link(e.path, d, follow_symlinks=False)
                made.append(d)
            # fifos, sockets, devices: moved back after the swap
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                raise _Fallback(exc) from exc
            raise


def _move_back(src: str, dst: str, kept: list[str]) -> None:
    try:
        _rename_noreplace(src, dst)
    except OSError:
        kept.append(src)


def _clear(old: str, final: str, rel: str = "") -> list[str]:
    """Empties ``old``, the folder that ``final`` was before the new checkpoint replaced it:
    an entry is deleted where ``final`` has a non-folder of the same name (the same file
    through another link, or its replacement), or where it is a top-level weight file that
    ``final`` lacks (stale); every other entry is moved back into ``final``. Returns the
    paths it had to keep in ``old``."""
    kept: list[str] = []
    here = os.path.join(old, rel)
    if not os.access(here, os.W_OK | os.X_OK):
        os.chmod(here, stat.S_IMODE(os.lstat(here).st_mode) | stat.S_IWUSR | stat.S_IXUSR)
    for e in _entries(here):
        r = os.path.join(rel, e.name)
        f = os.path.join(final, r)
        try:
            fst = os.lstat(f)
        except FileNotFoundError:
            fst = None
        if e.is_dir(follow_symlinks=False):
            if fst is not None and stat.S_ISDIR(fst.st_mode):
                sub = _clear(old, final, r)
                kept += sub
                if not sub:
                    os.rmdir(e.path)
            elif fst is None:
                _move_back(e.path, f, kept)
            else:
                kept.append(e.path)
        elif fst is not None and not stat.S_ISDIR(fst.st_mode):
            os.unlink(e.path)
        elif fst is None and not rel and _weight_variant(e.name) is not None:
            os.unlink(e.path)
        elif fst is None:
            _move_back(e.path, f, kept)
        else:
            kept.append(e.path)
    return kept


def _discard(stage: str, final: str) -> None:
    """Removes a staging folder that was never swapped in: its top-level files are the new
    save's (or links to files of ``final``); in its sub-folders, a file that ``final`` lacks
    (deleted there during the save) is moved back rather than deleted."""
    for e in _entries(stage):
        f = os.path.join(final, e.name)
        if e.is_dir(follow_symlinks=False):
            if os.path.isdir(f) and not os.path.islink(f):
                kept = _clear(stage, final, e.name)
                if kept:
                    raise OSError(f"hfquant: kept {stage}: it holds files that could not be put back into {final}")
                os.rmdir(e.path)
            else:
                shutil.rmtree(e.path)
        else:
            os.unlink(e.path)
    os.rmdir(stage)


def _finish_old(old: str, final: str) -> None:
    kept = _clear(old, final)
    if kept:
        logger.warning("hfquant: kept %s: it holds %d entries of %s that could not be put back (%s)", old,
                       len(kept), final, ", ".join(kept[:3]))
    else:
        os.rmdir(old)


def _strays(parent: str, name: str) -> dict[tuple[str, str], dict]:
    """{(pid, rand): {"save": (path, inode or None), "old": path}}: what the saves into
    ``parent/name`` of dead processes (or earlier ones of this process) left behind."""
    pat = re.compile(re.escape(f".{name}.hfquant-") + r"(save|old)-(\d+)-([a-z0-9_]+)(?:-(\d+))?")
    found: dict = {}
    for entry in os.listdir(parent):
        m = pat.fullmatch(entry)
        if m is None or (m[1] == "old" and m[4] is not None):
            continue
        pid = int(m[2])
        if (m[2], m[3]) in _ACTIVE or (pid != os.getpid() and _pid_alive(pid)):
            continue
        path = os.path.join(parent, entry)
        found.setdefault((m[2], m[3]), {})[m[1]] = (path, int(m[4]) if m[4] else None) if m[1] == "save" else path
    return found


def _recover(final: str) -> None:
    """Finishes or undoes what interrupted saves into ``final`` left (see the module docstring)."""
    parent, name = os.path.split(final)
    for _key, found in sorted(_strays(parent, name).items()):
        stage, ino = found.get("save", (None, None))
        old = found.get("old")
        try:
            if old is not None:  # the fallback was moving files one by one: complete it
                if stage is not None and os.path.exists(os.path.join(stage, _COMPLETE)):
                    _move_in(stage, final, old)
                elif stage is not None:
                    _discard(stage, final)
                _finish_old(old, final)
            elif ino is not None and os.lstat(stage).st_ino != ino:  # swapped: this is the old folder
                if os.path.isdir(final):
                    _finish_old(stage, final)
                else:
                    _rename_noreplace(stage, final)  # all that is left of the folder: restore it
            else:  # the staging folder, never swapped in
                _discard(stage, final)
        except OSError as exc:
            logger.warning("hfquant: could not clean up after an interrupted save into %s (%s)", final, exc)


def _make_stage(parent: str, name: str) -> tuple[str, tuple[str, str]]:
    prefix = f".{name}.hfquant-save-{os.getpid()}-"
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    key = (str(os.getpid()), os.path.basename(tmp)[len(prefix):])
    _ACTIVE.add(key)
    stage = f"{tmp}-{os.lstat(tmp).st_ino}"
    os.rename(tmp, stage)
    return stage, key


def _old_of(stage: str) -> str:
    """The fallback's folder for the replaced files of the save that ``stage`` belongs to."""
    base = os.path.basename(stage).rsplit("-", 1)[0]  # without the inode
    return os.path.join(os.path.dirname(stage), base.replace(".hfquant-save-", ".hfquant-old-", 1))


def _move_in(stage: str, final: str, old: str) -> None:
    """The fallback's moves, as the plan in ``stage``'s completion mark lists them: the stale
    weight files of ``final`` go to ``old``, then each top-level entry the save wrote replaces
    its namesake in ``final`` (which goes to ``old`` first). Safe to repeat after a kill."""
    with open(os.path.join(stage, _COMPLETE), encoding="utf-8") as f:
        plan = json.load(f)
    for n in plan["stale"]:
        if os.path.lexists(os.path.join(final, n)):
            _rename_noreplace(os.path.join(final, n), os.path.join(old, n))
    for n in plan["written"]:
        new, f = os.path.join(stage, n), os.path.join(final, n)
        if not os.path.lexists(new):
            continue  # moved in before a kill
        if os.path.lexists(f):
            _rename_noreplace(f, os.path.join(old, n))
        _rename_noreplace(new, f)
    os.unlink(os.path.join(stage, _COMPLETE))
    os.rmdir(stage)


def _commit(stage: str, final: str) -> None:
    """Puts the checkpoint written into ``stage`` in place (see the module docstring)."""
    for r in _files(stage):
        _fsync(os.path.join(stage, r))
    _fsync(stage, directory=True)
    parent = os.path.dirname(final)
    if not os.path.isdir(final):
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)
        try:
            _rename_noreplace(stage, final)
            _fsync(parent, directory=True)
            return
        except FileExistsError:
            pass  # created meanwhile: merge into it
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
    written = os.listdir(stage)
    variants = {_weight_variant(n) for n in written} - {None}
    stale = {n for n in os.listdir(final) if n not in written and _weight_variant(n) in variants
             and not os.path.isdir(os.path.join(final, n))}
    made: list[str] = []
    try:
        _mirror(final, stage, stale, made)
        os.chmod(stage, stat.S_IMODE(os.stat(final).st_mode))
        _exchange(stage, final)
    except (_Fallback, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in _UNSUPPORTED:
            raise
        logger.info("hfquant: saving into %s file by file (%s)", final, exc)
        for path in reversed(made):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
        with open(os.path.join(stage, _COMPLETE), "w", encoding="utf-8") as f:
            json.dump({"written": sorted(written), "stale": sorted(stale)}, f)
            f.flush()
            os.fsync(f.fileno())
        old = _old_of(stage)
        os.mkdir(old)  # from here on the next save completes the moves
        _move_in(stage, final, old)
        _fsync(final, directory=True)
    else:
        _fsync(parent, directory=True)
        old = stage
    try:
        _finish_old(old, final)
    except OSError as exc:  # the new checkpoint is in place; the next save finishes the cleanup
        logger.warning("hfquant: could not clear the old files of %s from %s (%s)", final, old, exc)


def _reason(exc: BaseException) -> tuple[str, int | None]:
    """What went wrong, in words, and its errno where there is one."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc), exc.errno
    m = re.search(r"I/O error: (.+) \(os error (\d+)\)", str(exc))  # safetensors' wrapped io::Error
    return (m[1], int(m[2])) if m else (str(exc), None)


@contextlib.contextmanager
def atomic_dir(final: str):
    """Yields a staging folder to write a checkpoint into. On success the files written
    replace their namesakes in ``final`` (and stale weight shards of an older checkpoint)
    in one step, and every other file and folder of ``final`` stays as it was; on failure
    ``final`` is left as it was. See the module docstring."""
    final = os.path.abspath(os.fspath(final))
    if os.path.islink(final) and os.path.isdir(final):
        final = os.path.realpath(final)  # save into the folder a symlink names, keep the symlink
    if os.path.lexists(final) and not os.path.isdir(final):
        raise ValueError(f"hfquant: output {final} is a file, not a directory")
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    _recover(final)
    stage, key = _make_stage(parent, name)
    ino = os.lstat(stage).st_ino
    try:
        yield stage
        _commit(stage, final)
    except BaseException as exc:
        moving = os.path.isdir(_old_of(stage))  # the fallback had begun to move files
        with contextlib.suppress(OSError):
            if not moving and os.lstat(stage).st_ino == ino:  # never swapped in
                _discard(stage, final)
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
            state = "the next save into it completes the change" if moving else "the folder was left as it was"
            reason, code = _reason(exc)
            err = OSError(f"hfquant: could not save into {final}: {reason} ({state})")
            err.errno = code
            raise err from exc
        raise
    finally:
        _ACTIVE.discard(key)


def save_pretrained(model, save_directory, **kwargs):
    """``model.save_pretrained(save_directory, **kwargs)`` made atomic (atomic_dir): the files
    are written into a staging folder that then replaces their namesakes in one step, so an
    interrupted save leaves the old checkpoint, and the folder's other files (optimizer state,
    logs, a README) stay as they were. Works for anything with a save_pretrained (models,
    tokenizers). ``push_to_hub`` and non-main processes save in place, as transformers does."""
    if not callable(getattr(model, "save_pretrained", None)):
        raise ValueError(f"hfquant.save_pretrained: {type(model).__name__} has no save_pretrained")
    if kwargs.get("push_to_hub") or not kwargs.get("is_main_process", True):
        return model.save_pretrained(save_directory, **kwargs)
    if not isinstance(save_directory, (str, os.PathLike)):
        raise ValueError(f"hfquant.save_pretrained: the save directory must be a path, got {save_directory!r}")
    with atomic_dir(save_directory) as stage:
        return model.save_pretrained(stage, **kwargs)
