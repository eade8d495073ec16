"""The README's ```python blocks run as written: in order, in one namespace (a later block
uses the names of an earlier one), in a temporary working directory, on the default model."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, source) of every ```python block of a markdown text."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


def run_blocks(blocks: list[tuple[int, str]], namespace: dict) -> None:
    """Executes the blocks in order in ``namespace``; a block that raises fails with its line."""
    for line, source in blocks:
        try:
            exec(compile(source, f"README.md, block at line {line}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"README.md: the python block at line {line} raised "
                                 f"{type(exc).__name__}: {exc}") from exc


def test_python_blocks_are_found():
    text = "intro\n```python\na = 1\n```\n\n```\nnot python\n```\n```python\nb = a + 1\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n"), (9, "b = a + 1\n")]
    ns: dict = {}
    run_blocks(python_blocks(text), ns)
    assert ns["b"] == 2


def test_a_raising_block_fails():
    with pytest.raises(AssertionError, match=r"^README.md: the python block at line 7 raised NameError: "
                                             r"name 'tok' is not defined$"):
        run_blocks([(3, "x = 1\n"), (7, "tok.save_pretrained('out')\n")], {})


def test_readme_python_blocks_run(model_dir, tmp_path, monkeypatch):
    from hfquant.nn import QuantLinear

    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5, f"README.md has {len(blocks)} python blocks"
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(2)
    ns: dict = {"__name__": "__readme__"}
    run_blocks(blocks, ns)
    # what the blocks claim: the default model, quantized, saved and reloaded; QAT converted and saved
    assert str(ns["path"]) == str(model_dir)
    assert any(isinstance(m, QuantLinear) for m in ns["again"].modules())
    assert (tmp_path / "out" / "config.json").is_file()
    assert any(isinstance(m, QuantLinear) for m in ns["trained"].modules())
    assert (tmp_path / "qat-out" / "config.json").is_file()
