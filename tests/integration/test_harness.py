"""lm-evaluation-harness on a saved hfquant checkpoint, offline, on a tiny local task built from
WikiText-2: the Python API route and the command-line route. lm-eval is a test dependency
(`make install` adds it; see docs/evaluation.md), so its absence is an error, not a skip."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch

try:
    import lm_eval
except ImportError as e:  # pragma: no cover - the Makefile installs it
    raise ImportError("tests/integration/test_harness.py needs lm-eval: `make install` (or pip install lm-eval)") from e

from transformers import AutoModelForCausalLM  # noqa: E402

import hfquant  # noqa: E402
from hfquant.evaluate.harness import prefix_token_id, simple_evaluate, write_text_task  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def docs(wikitext):
    parts = [p.strip() for p in wikitext.split("\n = ") if len(p.strip()) > 600]
    return [p[:500] for p in parts[:2]]


@pytest.fixture(scope="module")
def checkpoint(model_dir, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("w8ckpt") / "w8"
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=hfquant.HfQuantConfig(bits=8,
                                                                                                      group_size=-1))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def task_dir(docs, tmp_path_factory):
    return write_text_task(str(tmp_path_factory.mktemp("tasks")), docs)


@pytest.fixture(scope="module")
def api_result(checkpoint, tokenizer, task_dir, monkeypatch_module):
    for k, v in OFFLINE.items():
        monkeypatch_module.setenv(k, v)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    qc = model.config.quantization_config
    assert (qc["quant_method"] if isinstance(qc, dict) else qc.quant_method) == "hfquant"
    res = simple_evaluate(model, tokenizer, ["hfquant_text"], include_path=task_dir)
    return model, res["results"]["hfquant_text"]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@torch.no_grad()
def test_api_route_matches_our_own_log_likelihoods(api_result, tokenizer, docs):
    model, r = api_result
    # the harness's loglikelihood_rolling: each document after one prefix token, every token scored
    prefix = prefix_token_id(model, tokenizer)
    ll, words, nbytes = 0.0, 0, 0
    for d in docs:
        ids = torch.tensor([[prefix] + tokenizer(d, add_special_tokens=False).input_ids])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        ll += float(logp.gather(1, ids[0, 1:, None]).sum())
        words += len(re.split(r"\s+", d))
        nbytes += len(d.encode("utf-8"))
    assert abs(r["word_perplexity,none"] / math.exp(-ll / words) - 1) < 1e-3
    assert abs(r["byte_perplexity,none"] / math.exp(-ll / nbytes) - 1) < 1e-3
    assert abs(r["bits_per_byte,none"] - math.log2(r["byte_perplexity,none"])) < 1e-6
    assert 1.5 < r["byte_perplexity,none"] < 4  # a 135M model on Wikipedia prose


def test_command_line_route_loads_the_hfquant_checkpoint(api_result, checkpoint, task_dir, tmp_path):
    _, r = api_result
    env = dict(os.environ, **OFFLINE)
    p = subprocess.run([sys.executable, "-m", "hfquant.evaluate.harness", "run", "--model", "hf",
                        "--model_args", f"pretrained={checkpoint},dtype=float32,prefix_token_id=1",
                        "--include_path", task_dir, "--tasks", "hfquant_text", "--device", "cpu",
                        "--batch_size", "1"], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    row = next(line for line in p.stdout.splitlines() if "byte_perplexity" in line)
    cells = [c.strip() for c in row.split("|")]  # | task | ... | metric | ↓ | value | ± | stderr |
    value = float(next(c for c in cells[cells.index("byte_perplexity") + 1:] if re.fullmatch(r"[0-9.]+", c)))
    assert abs(value / r["byte_perplexity,none"] - 1) < 1e-3, row
