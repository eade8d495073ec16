"""benchmarks/choose_defaults.py without measuring: merging kept runs (a later run's questions
replace an earlier's, a question reworded since is dropped), the pick among the candidates the
format can store, the exit code when a default is not the pick, and the section it writes."""
from __future__ import annotations

import json

import pytest
from _utils import load_benchmark


@pytest.fixture(scope="module")
def choose():
    return load_benchmark("choose_defaults")


def _run(choose, questions: dict[str, list[tuple[str, float, bool]]], command: str, threads=1) -> dict:
    return {"command": command, "base": [28.0, 30.0], "windows": 8, "threads": threads, "cpu": "a CPU",
            "date": "2026-12-07", "seconds": 10.0, "model_dir": "model",
            "results": [{"question": q, "candidates": [{"label": lab, "valid": v, "test": v + 2, "default": d}
                                                      for lab, v, d in cands]} for q, cands in questions.items()]}


def test_merge_replaces_and_drops(choose):
    grid, fold = choose.all_questions()[0][0], "LLM.int8 fold_norms"
    first = _run(choose, {grid: [("range (default)", 41.0, True),
                                 ("GGUF Q4_0 (llama.cpp's rounding)", 38.0, False)],
                          fold: [("on (default)", 29.0, True), ("off", 28.5, False)],
                          "a question reworded since": [("x", 1.0, True)]}, "run 1")
    second = _run(choose, {fold: [("on (default)", 28.4, True), ("off", 28.8, False)]}, "run 2", threads=2)
    results, base, commands, windows, threads, *_ = choose.merge_runs([first, second])
    assert [r["question"] for r in results] == [grid, fold]
    assert results[1]["candidates"][0]["valid"] == 28.4  # the later run's
    assert commands == ["run 1", "run 2"] and threads == "1/2" and windows == 8 and base == [28.0, 30.0]
    with pytest.raises(SystemExit, match="differ in model, windows or baseline"):
        choose.merge_runs([first, dict(second, windows=4)])


def test_render_picks_storable_and_flags_a_default_not_picked(choose, tmp_path):
    grid = choose.all_questions()[0][0]
    run = _run(choose, {grid: [("range (default)", 41.0, True),
                               ("GGUF Q4_0 (llama.cpp's rounding)", 38.0, False)]}, "run")
    doc = tmp_path / "accuracy.md"
    doc.write_text("# Accuracy\n\nkept text\n")
    rc = choose.render(*choose.merge_runs([run]), doc)
    text = doc.read_text()
    assert rc == 0 and "kept text" in text and "<!-- bench:defaults-validation:begin -->" in text
    assert "| range (default) | 41.000 (+46.43%) | 43.000 (+43.33%) | **chosen** |" in text
    assert "GGUF's format, for comparison (lowest; not a candidate for the default)" in text
    fold = _run(choose, {"LLM.int8 fold_norms": [("on (default)", 29.0, True), ("off", 28.5, False)]}, "run")
    assert choose.render(*choose.merge_runs([fold]), None) == 1


def test_from_json_lists_every_command(choose, tmp_path, capsys):
    grid = choose.all_questions()[0][0]
    paths = []
    for i in (1, 2):
        p = tmp_path / f"run{i}.json"
        p.write_text(json.dumps(_run(choose, {grid: [("range (default)", 41.0 + i, True)]},
                                     f"measure {i}")))
        paths.append(str(p))
    assert choose.main(["--from-json", *paths]) == 0
    out = capsys.readouterr().out
    assert "`measure 1`; `measure 2`; `python benchmarks/choose_defaults.py --from-json" in out
    assert "43.000" in out and "42.000" not in out


def test_render_kept_default_with_its_reason(choose, capsys):
    question = next(iter(choose.KEPT))
    run = _run(choose, {question: [("integer (default)", 34.0, True), ("float", 28.3, False)]}, "run")
    assert choose.render(*choose.merge_runs([run]), None) == 0  # kept, with the reason written down
    out = capsys.readouterr().out
    assert f"Kept against validation: {question}: validation picks 'float'; the default is kept: " in out
    assert question in [q for q, _ in choose.all_questions()]
