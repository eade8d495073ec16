"""lm-evaluation-harness on hfquant checkpoints.

A saved hfquant checkpoint loads with ``AutoModelForCausalLM.from_pretrained`` once
``import hfquant`` has registered the method with transformers; the harness's own command
does not import hfquant, so this module is its command with hfquant imported first:

    python -m hfquant.evaluate.harness run --model hf --model_args pretrained=OUT \\
        --include_path my_tasks/ --tasks my_task --device cpu

(the arguments are lm_eval's own; ``lm_eval --help`` lists them). From Python, pass the
loaded model to the harness's HF wrapper instead: see :func:`simple_evaluate`. Offline, use
a task whose data is a local file (``dataset_path: json`` with ``data_files``) and set
HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1; :func:`write_text_task` writes such a task.
"""
from __future__ import annotations

import json
import os
import sys


def write_text_task(folder: str, texts: list[str], name: str = "hfquant_text") -> str:
    """Writes an lm-eval task (``loglikelihood_rolling``: word/byte perplexity and bits per
    byte over whole documents, the harness's WikiText recipe) reading ``texts`` from a local
    JSON-lines file; returns the folder, to give as ``include_path`` / ``--include_path``."""
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("write_text_task: give at least one non-empty document")
    os.makedirs(folder, exist_ok=True)
    data = os.path.abspath(os.path.join(folder, f"{name}.jsonl"))
    with open(data, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    yaml = (f"task: {name}\n"
            "dataset_path: json\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    test: {json.dumps(data)}\n"
            "test_split: test\n"
            "output_type: loglikelihood_rolling\n"
            "doc_to_text: \"\"\n"
            "doc_to_target: \"{{text}}\"\n"
            "metric_list:\n"
            "  - metric: word_perplexity\n"
            "  - metric: byte_perplexity\n"
            "  - metric: bits_per_byte\n")
    with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as f:
        f.write(yaml)
    return folder


def prefix_token_id(model, tokenizer) -> int | None:
    """The token the harness puts before each document: the tokenizer's BOS (else EOS), else
    the model config's. A tokenizer without special tokens (a checkpoint converted from GGUF)
    would otherwise make the harness fail; on the command line give
    ``--model_args pretrained=OUT,prefix_token_id=ID``."""
    for src in (tokenizer, getattr(model, "config", None)):
        for attr in ("bos_token_id", "eos_token_id"):
            v = getattr(src, attr, None)
            if isinstance(v, list):
                v = v[0] if v else None
            if isinstance(v, int):
                return v
    return None


def simple_evaluate(model, tokenizer, tasks: list[str], include_path: str | None = None, batch_size: int = 1,
                    max_length: int | None = None, **kwargs) -> dict:
    """``lm_eval.simple_evaluate`` on an already loaded (quantized) model: the harness's
    HFLM wraps the model object, so nothing is reloaded. Returns the harness's results dict."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError("hfquant.evaluate.harness needs lm-evaluation-harness: pip install lm-eval") from exc
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              prefix_token_id=prefix_token_id(model, tokenizer))
    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, **kwargs)


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with hfquant registered."""
    import hfquant  # noqa: F401  (registers the "hfquant" quantization method)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        sys.exit("hfquant.evaluate.harness: lm-evaluation-harness is not installed (pip install lm-eval)")
    sys.argv = ["lm_eval"] + (sys.argv[1:] if argv is None else list(argv))
    cli_evaluate()


if __name__ == "__main__":
    main()
