"""hfquant.save_pretrained (the atomic save) into a folder that holds more than a checkpoint (a Trainer output folder):
the other files survive, the checkpoint switches in one step (kill -9 at every file-system
call of the save leaves the old or the new one), a full disk changes nothing, and the next
save cleans up after a killed one. A tiny random Llama keeps it fast."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import transformers.modeling_utils as mu
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from _utils import save_tiny_llama

import hfquant
import hfquant.fileio as fio
from hfquant.cli import main as cli_main
from hfquant.nn import QuantLinear

QCONFIG = dict(bits=4, group_size=32)
IDS = torch.tensor([[1, 17, 200, 3, 99, 254]])
CHECKPOINT = {"config.json", "generation_config.json"}


def _is_checkpoint_file(rel: str) -> bool:
    return rel in CHECKPOINT or fio._weight_variant(rel) is not None


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("save_safety")


@pytest.fixture(scope="module")
def float_dir(root):
    return save_tiny_llama(root / "float")


@pytest.fixture(scope="module")
def qmodel(float_dir):
    return AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=hfquant.HfQuantConfig(**QCONFIG))


@pytest.fixture(scope="module")
def refs(root, float_dir, qmodel):
    """{"old": tensors of the float checkpoint, "new": tensors the quantized save writes}."""
    hfquant.save_pretrained(qmodel, root / "new_ref")
    return {"old": load_file(float_dir / "model.safetensors"), "new": load_file(root / "new_ref" / "model.safetensors")}


def _trainer_folder(path, float_dir, sharded_from=None):
    """A Trainer-style output folder holding the float checkpoint and a run's other files."""
    if sharded_from is not None:
        sharded_from.save_pretrained(path, max_shard_size="20KB")
    else:
        shutil.copytree(float_dir, path)
    (path / "runs" / "exp1").mkdir(parents=True)
    (path / "checkpoint-100").mkdir()
    (path / "optimizer.pt").write_bytes(os.urandom(3000))
    (path / "scheduler.pt").write_bytes(b"scheduler state")
    (path / "training_args.bin").write_bytes(b"\x00\x01args")
    (path / "runs" / "exp1" / "events.log").write_text("step 1 loss 2.0\n")
    (path / "checkpoint-100" / "x.txt").write_text("x")
    (path / "README.md").write_text("# my run\n")
    os.symlink("checkpoint-100", path / "latest")
    os.symlink("optimizer.pt", path / "optimizer.link")
    return path


def _user_files(path) -> dict:
    """Every entry that is not a checkpoint file: {relative path: bytes, ("link", target) or "dir"}."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                out[rel] = ("link", os.readlink(full))
                if name in dirnames:
                    dirnames.remove(name)
            elif os.path.isdir(full):
                out[rel] = "dir"
            elif not _is_checkpoint_file(rel):
                with open(full, "rb") as f:
                    out[rel] = f.read()
    return out


def _state(path, refs) -> str | None:
    """"old" or "new" when the folder holds exactly that checkpoint, None for anything else."""
    try:
        with open(path / "config.json") as f:
            quantized = "quantization_config" in json.load(f)
        names = sorted(n for n in os.listdir(path) if fio._weight_variant(n) is not None)
        if names != ["model.safetensors"]:
            return None
        tensors = load_file(path / "model.safetensors")
    except (OSError, ValueError):
        return None
    for state in ("old", "new"):
        ref = refs[state]
        if quantized == (state == "new") and tensors.keys() == ref.keys() and all(
                torch.equal(tensors[k], ref[k]) for k in ref):
            return state
    return None


def _no_strays(path):
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_trainer_folder_survives_the_save(tmp_path, float_dir, qmodel, refs):
    target = _trainer_folder(tmp_path / "run", float_dir)
    os.chmod(target, 0o751)
    users = _user_files(target)
    inode = os.stat(target / "optimizer.pt").st_ino
    hfquant.save_pretrained(qmodel, target)
    assert _user_files(target) == users
    assert os.stat(target / "optimizer.pt").st_ino == inode  # the same file, not a copy
    assert os.stat(target).st_mode & 0o777 == 0o751
    assert _state(target, refs) == "new"
    _no_strays(target)
    again = AutoModelForCausalLM.from_pretrained(target)
    assert isinstance(again.model.layers[0].self_attn.q_proj, QuantLinear)
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, qmodel(IDS).logits)


def test_stale_shards_of_an_older_save_are_removed(tmp_path, float_dir, qmodel, refs):
    float_model = AutoModelForCausalLM.from_pretrained(float_dir)
    target = _trainer_folder(tmp_path / "run", float_dir, sharded_from=float_model)
    shards = [n for n in os.listdir(target) if n.startswith("model-")]
    assert len(shards) > 2 and (target / "model.safetensors.index.json").exists()
    (target / "model.fp16.safetensors").write_bytes(b"another variant: not ours to remove")
    users = _user_files(target)
    hfquant.save_pretrained(qmodel, target)
    assert _user_files(target) == users
    assert sorted(n for n in os.listdir(target) if _is_checkpoint_file(n)) == [
        "config.json", "generation_config.json", "model.fp16.safetensors", "model.safetensors"]
    assert _state(target, refs) is None  # the fp16 variant file is there too
    os.unlink(target / "model.fp16.safetensors")
    assert _state(target, refs) == "new"
    # and back: a sharded save over a single file leaves no model.safetensors behind
    hfquant.save_pretrained(qmodel, target, max_shard_size="20KB")
    assert not (target / "model.safetensors").exists() and (target / "model.safetensors.index.json").exists()
    assert _user_files(target) == users


# A process that loads the quantized model once, then for each request forks a child that
# saves with one file-system call turned into SIGKILL (or a file size limit).
SERVER = r"""
import os, resource, shutil, signal, sys
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
import transformers.configuration_utils as cu
import transformers.generation.configuration_utils as gu
import transformers.modeling_utils as mu
import hfquant, hfquant.fileio as fio

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=hfquant.HfQuantConfig(bits=4,
                                                                                                   group_size=32))

def arm(n, fallback):
    count = [0]
    def wrap(owner, attr):
        real = getattr(owner, attr)
        def call(*a, **k):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        setattr(owner, attr, call)
    if fallback:
        def no_exchange(a, b):
            raise OSError(22, "exchange not supported here")
        fio._exchange = no_exchange
    for attr in ("link", "symlink", "rename", "replace", "mkdir", "unlink", "rmdir"):
        wrap(os, attr)
    for owner, attr in ((fio, "_exchange"), (fio, "_rename_noreplace"), (shutil, "rmtree"), (mu, "safe_save_file"),
                        (cu.PretrainedConfig, "to_json_file"), (gu.GenerationConfig, "to_json_file")):
        wrap(owner, attr)

print("ready", flush=True)
for line in sys.stdin:
    what, arg, target = line.split()
    pid = os.fork()
    if pid == 0:
        if what == "fsize":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(arg), resource.RLIM_INFINITY))
        else:
            arm(int(arg), what == "fallback")
        try:
            hfquant.save_pretrained(model, target)
        except BaseException as exc:
            print(f"error {exc}", flush=True)
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    print("killed" if killed else f"exit {os.WEXITSTATUS(status)}", flush=True)
"""


@pytest.fixture(scope="module")
def server(float_dir):
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(float_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "ready"

    def ask(what, arg, target):
        proc.stdin.write(f"{what} {arg} {target}\n")
        proc.stdin.flush()
        lines = []
        while True:
            line = proc.stdout.readline()
            assert line, "the save server died"
            lines.append(line.strip())
            if line.startswith(("killed", "exit")):
                return lines

    yield ask
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_kill_at_every_step_leaves_old_or_new(tmp_path, float_dir, qmodel, refs, server, mode):
    template = _trainer_folder(tmp_path / "template", float_dir)
    users = _user_files(template)
    seen = []
    for n in range(1, 200):
        work = tmp_path / f"kill{n}"
        target = work / "run"
        work.mkdir()
        shutil.copytree(template, target, symlinks=True)
        lines = server("kill" if mode == "exchange" else "fallback", n, target)
        state = _state(target, refs)
        seen.append(state)
        assert _user_files(target) == users, f"call {n}"
        if mode == "exchange" or lines[-1] == "exit 0":
            assert state in ("old", "new"), f"call {n}"
        if state is not None:
            AutoModelForCausalLM.from_pretrained(target)  # loadable as it is
        hfquant.save_pretrained(qmodel, target)  # the next save cleans up and succeeds
        assert _state(target, refs) == "new", f"call {n}"
        assert _user_files(target) == users, f"call {n}"
        _no_strays(target)
        shutil.rmtree(work)
        if lines[-1] == "exit 0":
            break
        assert lines == ["killed"], f"call {n}: {lines}"
    assert n >= 10 and seen[0] == "old" and seen[-1] == "new"
    if mode == "exchange":
        assert set(seen) == {"old", "new"}
    else:
        assert None in seen  # the documented window: between the moves neither checkpoint is whole


def _left_as_it_was(target, refs, users) -> None:
    """A failed save: the old checkpoint, every user file unchanged, no staging folder left."""
    assert _state(target, refs) == "old"
    assert _user_files(target) == users
    _no_strays(target)


def test_full_disk_changes_nothing(tmp_path, float_dir, refs, server):
    target = _trainer_folder(tmp_path / "run", float_dir)
    users = _user_files(target)
    lines = server("fsize", 8192, target)  # config.json fits, the weights do not: EFBIG
    assert lines == [f"error hfquant: could not save into {target}: File too large (the folder was left as it was)",
                     "exit 3"]
    _left_as_it_was(target, refs, users)


def test_no_space_while_writing_weights(tmp_path, float_dir, qmodel, refs, monkeypatch):
    target = _trainer_folder(tmp_path / "run", float_dir)
    users = _user_files(target)
    real = mu.safe_save_file

    def half_written(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mu, "safe_save_file", half_written)
    with pytest.raises(OSError) as info:
        hfquant.save_pretrained(qmodel, target)
    assert str(info.value) == (f"hfquant: could not save into {target}: No space left on device "
                               "(the folder was left as it was)")
    assert info.value.errno == errno.ENOSPC
    _left_as_it_was(target, refs, users)


def test_without_hard_links_the_fallback_keeps_every_file(tmp_path, float_dir, qmodel, refs, monkeypatch):
    target = _trainer_folder(tmp_path / "run", float_dir)
    users = _user_files(target)

    def no_link(*a, **k):
        raise OSError(errno.EPERM, "hard links not allowed here")

    monkeypatch.setattr(os, "link", no_link)
    hfquant.save_pretrained(qmodel, target)
    assert _state(target, refs) == "new"
    assert _user_files(target) == users
    _no_strays(target)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_strays_give_back_user_files_and_live_ones_stay(tmp_path, float_dir, qmodel, refs):
    target = _trainer_folder(tmp_path / "run", float_dir)
    # the old folder of a killed save (swapped out: its inode is not the one in its name) that
    # holds the only link of a file created during that save, and an old config
    old = tmp_path / f".run.hfquant-save-{_dead_pid()}-abcd1234-1"
    (old / "sub").mkdir(parents=True)
    (old / "notes.txt").write_text("only here")
    (old / "config.json").write_text("{}")
    (old / "runs").mkdir()
    (old / "runs" / "late.log").write_text("late")
    # a staging folder of a save that is still running (this test's parent process)
    live = tmp_path / f".run.hfquant-save-{os.getppid()}-live0000-2"
    live.mkdir()
    (live / "config.json").write_text("{}")
    hfquant.save_pretrained(qmodel, target)
    assert (target / "notes.txt").read_text() == "only here"
    assert (target / "runs" / "late.log").read_text() == "late"
    assert (target / "sub").is_dir()
    assert not old.exists() and live.exists()
    assert _state(target, refs) == "new"


def test_a_folder_left_only_in_a_killed_save_is_restored(tmp_path, float_dir, qmodel, refs):
    """The old folder of a killed save, with no folder at the target: restored, then saved into."""
    old = _trainer_folder(tmp_path / f".run.hfquant-save-{_dead_pid()}-abcd1234-1", float_dir)
    users = _user_files(old)
    target = tmp_path / "run"
    hfquant.save_pretrained(qmodel, target)
    assert _user_files(target) == users
    assert _state(target, refs) == "new"
    _no_strays(target)


def test_quantize_into_its_own_input_folder_is_refused(tmp_path, float_dir, capsys):
    d = tmp_path / "model"
    shutil.copytree(float_dir, d)
    os.symlink(d, tmp_path / "alias")
    before = {n: (d / n).read_bytes() for n in os.listdir(d)}
    for out in (str(d), str(tmp_path / "alias")):
        assert cli_main(["quantize", str(d), out, "--bits", "4", "--group-size", "32"]) == 2
        err = capsys.readouterr().err
        assert err == (f"hfquant quantize: the output folder {out} is the input model folder {d}: saving would "
                       "replace the model it reads; choose another output folder\n")
    assert {n: (d / n).read_bytes() for n in os.listdir(d)} == before
    assert sorted(os.listdir(tmp_path)) == ["alias", "model"]
