"""benchmarks/bench_cuda.py --write-docs, checked without a GPU: the section it writes from a
run's rows (fake rows here) into a copy of docs/benchmarks.md, and --from-json."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _utils import load_benchmark

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:cuda:begin -->", "<!-- bench:cuda:end -->"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_cuda")


def fake_run(**extra) -> dict:
    results = [
        dict(kind="W4 g128", N=4096, K=4096, M=1, method="bf16 F.linear", us=16.0, gbps=2100.0, speedup=1.0),
        dict(kind="W4 g128", N=4096, K=4096, M=1, method="hfquant W4 g128", us=8.0, gbps=1200.0, speedup=2.0),
        dict(kind="int8", N=4096, K=11008, M=256, method="torch._int_mm", us=50.0, tflops=460.0, speedup=1.06),
        dict(kind="W4 path", N=4096, K=4096, M=128, method="W4 dequant+cuBLAS", us=72.3, speedup=0.2),
    ]
    run = dict(device="NVIDIA H100 80GB HBM3", torch="2.14.1+cu130", cuda="13.0", nominal_hbm=3.35e12,
               copy_bw=2.98e12, bitsandbytes=None, date="2026-12-01 10:00 UTC",
               command="python benchmarks/bench_cuda.py --sweep --json bench.json --write-docs", git="abc1234",
               quick=False, rounds=15, inner=20, partial=False, not_captured=["bitsandbytes NF4 g64"], wall_s=140.2,
               results=results)
    run.update(extra)
    return run


def section(text: str) -> str:
    return text[text.index(BEGIN) + len(BEGIN) + 1:text.index(END)]


def outside(text: str) -> tuple[str, str]:
    return text[:text.index(BEGIN)], text[text.index(END):]


def test_write_docs_replaces_only_the_cuda_section(bench, tmp_path):
    before = DOC.read_text()
    doc = tmp_path / "benchmarks.md"
    shutil.copyfile(DOC, doc)
    bench.write_docs(doc, fake_run())
    text = doc.read_text()
    assert outside(text) == outside(before)
    assert section(text).splitlines() == [
        "## CUDA (`benchmarks/bench_cuda.py`)",
        "",
        "Command: `python benchmarks/bench_cuda.py --sweep --json bench.json --write-docs`",
        "",
        "Card: NVIDIA H100 80GB HBM3 (nominal HBM 3.35 TB/s; a device-to-device copy measured 2.98 TB/s); "
        "torch 2.14.1+cu130, CUDA 13.0; bitsandbytes not available; hfquant source abc1234. "
        "Run 2026-12-01 10:00 UTC, 140 s.",
        "",
        "Method: every method of a (shape, M) in one process, interleaved round by round, median of 15 rounds; "
        "each round replays a CUDA graph of 20 calls timed with CUDA events (GPU time; a Python loop of small "
        "calls would time the host). Each call uses another copy of the weights, copies of at least three times "
        "the L2 in all, so weights come from HBM as in decode. Ops that synchronize with the host run eagerly. "
        "vs bf16: time of bf16 F.linear (cuBLAS) / time of the row.",
        "",
        "Timed eagerly because a CUDA graph could not capture them: bitsandbytes NF4 g64.",
        "",
        bench.DOC_TABLES[0][1],
        "",
        "| N x K | M | method | us | achieved | vs bf16 |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
        "| 4096x4096 | 1 | bf16 F.linear | 16.0 | 2.10 TB/s (63% of HBM) | 1.00x |",
        "| 4096x4096 | 1 | hfquant W4 g128 | 8.0 | 1.20 TB/s (36% of HBM) | 2.00x |",
        "",
        bench.DOC_TABLES[1][1],
        "",
        "| N x K | M | method | us | achieved | vs bf16 |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
        "| 4096x11008 | 256 | torch._int_mm | 50.0 | 460 TFLOP/s | 1.06x |",
        "",
        bench.DOC_TABLES[2][1],
        "",
        "| N x K | M | method | us | achieved | vs bf16 |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
        "| 4096x4096 | 128 | W4 dequant+cuBLAS | 72.3 |  | 0.20x |",
    ]
    # a second write replaces the section, it does not add one
    bench.write_docs(doc, fake_run(quick=True, partial=True, results=[]))
    text = doc.read_text()
    assert text.count(BEGIN) == 1 and outside(text) == outside(before)
    assert section(text).splitlines()[0] == ("## CUDA (`benchmarks/bench_cuda.py`): PLACEHOLDER from a `--quick` run "
                                             "(few rounds; do not quote) (PARTIAL: the run stopped before its end; "
                                             "the rows it measured)")
    assert section(text).splitlines()[-1] == "No results (the run stopped before its first measurement)."
    assert DOC.read_text() == before  # the repository's file is untouched


def test_from_json_writes_the_saved_run(bench, tmp_path):
    doc = tmp_path / "benchmarks.md"
    shutil.copyfile(DOC, doc)
    saved = tmp_path / "bench.json"
    saved.write_text(json.dumps(fake_run()))
    assert bench.main(["--from-json", str(saved), "--write-docs", "--docs", str(doc)]) == 0
    assert section(doc.read_text()) == bench.doc_section(fake_run())


def test_from_json_refuses_a_file_that_is_no_run(bench, tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    shutil.copyfile(DOC, doc)
    bad = tmp_path / "bench.json"
    bad.write_text(json.dumps({"device": "x"}))
    assert bench.main(["--from-json", str(bad), "--write-docs", "--docs", str(doc)]) == 2
    assert capsys.readouterr().err == (f"bench_cuda: {bad} is not a run saved by bench_cuda.py --json "
                                       "(no device or results)\n")
    missing = tmp_path / "nothing.json"
    assert bench.main(["--from-json", str(missing)]) == 2
    assert capsys.readouterr().err == f"bench_cuda: cannot read {missing}: No such file or directory\n"
    assert doc.read_text() == DOC.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without a GPU")
def test_without_a_gpu_it_says_so(bench, capsys):
    assert bench.main([]) == 2
    assert capsys.readouterr().err == ("bench_cuda: needs a GPU and hfquant built with HFQUANT_CUDA=1 (--from-json "
                                       "FILE writes the tables of a saved run without one)\n")


def test_command_line_names_files_without_their_folders(bench):
    args = bench.parse_args(["--quick", "--json", "/some/where/bench.json", "--write-docs", "--docs", "x.md"])
    assert bench.command_line(args) == "python benchmarks/bench_cuda.py --quick --json bench.json --write-docs"
