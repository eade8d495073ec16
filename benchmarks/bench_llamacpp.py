"""Side by side on the CPU: hfquant (through transformers) against llama.cpp, on the default model.

    python benchmarks/bench_llamacpp.py [--rounds 5] [--threads 2] [--write-docs]
    python benchmarks/bench_llamacpp.py --rounds 1 --prompt-tokens 64 --decode-tokens 8 --ppl-windows 2

llama.cpp comes from the package index: the sdist of llama-cpp-python (LLAMA_CPP_PYTHON below)
vendors llama.cpp's sources; it is fetched with pip (or read from ``--llamacpp-src``: the sdist
or a source folder), built with CMake (llama-bench, llama-quantize, llama-perplexity) and kept,
with the GGUF files, in ``<hfquant cache>/llamacpp-<version>/`` (``--work``). The default
model's plain checkpoint (hfquant.data.default_model_dir) is converted by llama.cpp's own
convert_hf_to_gguf.py to GGUF F16, then by llama-quantize to Q8_0, Q4_0 and Q4_K_M. hfquant
quantizes the same checkpoint once per run in the configs of `hfquant compare`
(hfquant.evaluate.run_one.CONFIGS) and saves it; each sample loads the saved checkpoint.

Every sample runs in a fresh process; each round measures all configs interleaved (llama.cpp,
hfquant, llama.cpp, ...; the starting config rotated every round); medians of ``--rounds``:

- prefill: one pass over a 512-token prompt, tokens/s (llama-bench pp512; hfquant.evaluate's
  prefill_speed: one forward);
- decode: 128 greedy tokens at batch 1 after that prompt, prefill excluded, tokens/s
  (llama-bench tg128 at depth 512; hfquant.evaluate's decode_speed: model.generate);
- peak RSS of the process that loads the model, reads the prompt and decodes (os.wait4's
  ru_maxrss; for hfquant, Python, torch and transformers included);
- file size: the GGUF file; the safetensors files of the hfquant checkpoint;
- perplexity change of each engine against its own float model, on the first ``--ppl-windows``
  windows of 512 tokens of WikiText-2 test (llama-perplexity; hfquant.evaluate.perplexity).
  llama.cpp scores the second half of each window only, hfquant every token, so only the
  relative changes compare.

``--write-docs`` writes the section "llamacpp" of docs/benchmarks.md (``--docs``).

Needs, besides hfquant's own: cmake and a C++ compiler (the build), and the Python packages of
llama.cpp's converter: numpy, gguf (hfquant's test extra) and sentencepiece
(``pip install sentencepiece``).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header_line, md_table, system_info, write_doc_section  # noqa: E402
from readme_measured import ROWS  # noqa: E402  (the labels of hfquant's configs)

from hfquant import data  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp is built
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TARGETS = ("llama-bench", "llama-quantize", "llama-perplexity")
STEM = "smollm2-135m-instruct"  # the GGUF files' names
# (pair, llama.cpp file type, hfquant config of hfquant.evaluate.run_one.CONFIGS or None); the
# float pair is always measured: every perplexity change is against it
# (w4g128 is the default, embedding and tied head at W8 as llama.cpp keeps them at 8 bits or more;
# w4g128f the same with both in float)
PAIRS = (("float", "F16", "fp32"), ("8-bit", "Q8_0", "w8"), ("4-bit", "Q4_0", "w4g128"),
         ("4-bit", "Q4_0", "w4g128f"), ("k-quant", "Q4_K_M", None))
LLAMA_TYPES = tuple(dict.fromkeys(t for _, t, _ in PAIRS))
HFQ_CONFIGS = tuple(c for _, _, c in PAIRS if c)
RESULT = "BENCH_RESULT "
# Runs a command and writes its ru_maxrss (KiB on Linux) from os.wait4 to a file. A small fresh
# interpreter starts it because Linux carries the parent's RSS high-water mark into a child
# through fork and exec: started from this process (torch loaded) every child would report at
# least this process's size. The launcher's own ~14 MiB is the floor.
LAUNCHER = ("import os, subprocess, sys\n"
            "p = subprocess.Popen(sys.argv[2:])\n"
            "_, status, usage = os.wait4(p.pid, 0)\n"
            "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def fail(message: str) -> NoReturn:
    raise SystemExit(f"bench_llamacpp: {message}")


def run_logged(cmd: list, log: Path, what: str, env: dict | None = None, capture: bool = True,
               measure_rss: bool = False) -> tuple[str, str, int]:
    """Runs cmd with its stdout and stderr appended to log (as it runs where capture is False);
    returns (stdout, stderr, peak RSS in KiB or 0). A failure ends the benchmark with the last
    lines of the output and where the log is."""
    cmd = [str(c) for c in cmd]
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp, open(log, "a") as f:
        rss_file = Path(tmp) / "rss"
        full = [sys.executable, "-c", LAUNCHER, str(rss_file), *cmd] if measure_rss else cmd
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            if capture:
                proc = subprocess.run(full, capture_output=True, text=True, env=env)
                f.write(proc.stdout + proc.stderr)
            else:
                proc = subprocess.run(full, stdout=f, stderr=subprocess.STDOUT, env=env)
        except OSError as exc:
            fail(f"{what} did not start: {exc}")
        if proc.returncode != 0:
            f.flush()
            out = proc.stdout + proc.stderr if capture else log.read_text(errors="replace")
            tail = "\n".join(out.strip().splitlines()[-15:])
            fail(f"{what} failed (exit {proc.returncode}); its last lines:\n{tail}\n(full log: {log})")
        out, err = (proc.stdout, proc.stderr) if capture else ("", "")
        return out, err, int(rss_file.read_text()) if measure_rss else 0


# ----------------------------------------------------------------------------- llama.cpp: sources and build

def sdist_version(src: Path) -> str:
    """llama-cpp-python's version from the PKG-INFO of an sdist (archive or folder); 'local' without one."""
    text = ""
    if src.is_file():
        try:
            with tarfile.open(src) as tf:
                member = next((m for m in tf.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")),
                              None)
                text = tf.extractfile(member).read().decode() if member else ""
        except (tarfile.TarError, OSError, EOFError) as exc:
            fail(f"--llamacpp-src {src} is no readable sdist (.tar.gz) archive: {str(exc).splitlines()[0]}")
    elif (src / "PKG-INFO").is_file():
        text = (src / "PKG-INFO").read_text()
    m = re.search(r"^Version: (\S+)", text, re.M)
    return m.group(1) if m else "local"


def llamacpp_sources(src: Path | None, work: Path, log: Path) -> Path:
    """The llama.cpp source folder: the vendored one of an sdist (pip-downloaded when src is None,
    extracted once into work/src) or src itself when it is a source folder."""
    if src is not None and src.is_dir():
        for d in (src, src / "vendor" / "llama.cpp"):
            if (d / "convert_hf_to_gguf.py").is_file() and (d / "CMakeLists.txt").is_file():
                return d
        fail(f"--llamacpp-src {src} holds neither llama.cpp's sources nor a llama-cpp-python sdist's vendor/llama.cpp")
    extracted = work / "src"
    if not extracted.is_dir():
        if src is None:
            dl = work / "download"
            dl.mkdir(parents=True, exist_ok=True)
            print(f"fetching the llama-cpp-python {LLAMA_CPP_PYTHON} sdist (llama.cpp's sources) with pip", flush=True)
            run_logged([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
                        "--no-binary", ":all:", "--disable-pip-version-check", "-d", dl], log, "pip download",
                       capture=False)
            src = dl / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
            if not src.is_file():
                fail(f"pip download left no {src.name} in {dl} (full log: {log})")
            got = data.sha256_file(src)
            if got != LLAMA_CPP_PYTHON_SHA256:
                fail(f"{src} has sha256 {got}, expected {LLAMA_CPP_PYTHON_SHA256} (a damaged or different file)")
        part = work / "src.part"
        shutil.rmtree(part, ignore_errors=True)
        with tarfile.open(src) as tf:
            tf.extractall(part, filter="data")
        os.replace(part, extracted)
    found = sorted(extracted.glob("*/vendor/llama.cpp/CMakeLists.txt"))
    if not found:
        fail(f"the sdist extracted in {extracted} has no */vendor/llama.cpp")
    return found[0].parent


def llamacpp_commit(llama: Path) -> str:
    """The vendored llama.cpp's commit, read from the git metadata the sdist ships (git is not run)."""
    try:
        dotgit = llama / ".git"
        gitdir = dotgit
        if dotgit.is_file():  # a submodule: "gitdir: ../../.git/modules/vendor/llama.cpp"
            gitdir = (llama / dotgit.read_text().split(":", 1)[1].strip()).resolve()
        head = (gitdir / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            head = (gitdir / ref).read_text().strip() if (gitdir / ref).is_file() else next(
                line.split()[0] for line in (gitdir / "packed-refs").read_text().splitlines() if line.endswith(ref))
        return head if re.fullmatch(r"[0-9a-f]{40}", head) else "unknown"
    except (OSError, IndexError, StopIteration):
        return "unknown"


CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
    # nothing that reaches the network (LLAMA_CURL is gone in this version; HTTPS is LLAMA_OPENSSL)
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
    # the commit comes from the sdist's files (LLAMA_BUILD_COMMIT): CMake asks no git, which in a
    # cache inside a checkout would report the checkout's commit
    "-DCMAKE_DISABLE_FIND_PACKAGE_Git=ON", "-DGIT_EXECUTABLE=", "-DGIT_EXE=",
]


def build(llama: Path, work: Path, commit: str, jobs: int, log: Path, extra: list[str]) -> Path:
    """Builds the TARGETS once into work/build (work/build-<hash> for extra CMake options);
    returns the folder of the binaries."""
    folder = work / ("build" if not extra else "build-" + hashlib.sha1(" ".join(extra).encode()).hexdigest()[:10])
    bindir = folder / "bin"
    if all((bindir / t).is_file() for t in TARGETS):
        return bindir
    cmake = shutil.which("cmake")
    if cmake is None:
        fail("cmake not found on PATH; it builds llama.cpp (apt install cmake, or pip install cmake)")
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        fail("no C++ compiler found (c++, g++, clang++ or $CXX); it builds llama.cpp")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    print(f"building llama.cpp {commit[:12]} ({', '.join(TARGETS)}), log in {log}", flush=True)
    t0 = time.perf_counter()
    run_logged([cmake, "-S", llama, "-B", folder, *gen, *CMAKE_OPTIONS, *extra,
                f"-DLLAMA_BUILD_COMMIT={commit[:7]}"], log, "cmake configure of llama.cpp", capture=False)
    run_logged([cmake, "--build", folder, "--target", *TARGETS, "-j", jobs], log, "cmake build of llama.cpp",
               capture=False)
    print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
    return bindir


def make_ggufs(llama: Path, bindir: Path, model_dir: Path, work: Path, types: list[str], jobs: int,
               log: Path) -> dict[str, Path]:
    """GGUF F16 by convert_hf_to_gguf.py, the other types by llama-quantize from it; each made once."""
    gdir = work / "gguf"
    gdir.mkdir(parents=True, exist_ok=True)
    files = {t: gdir / f"{STEM}-{t}.gguf" for t in ["F16"] + [t for t in types if t != "F16"]}
    for t, out in files.items():
        if out.is_file():
            continue
        part = out.with_suffix(".part")
        t0 = time.perf_counter()
        if t == "F16":
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(llama / "gguf-py"),
                                                                         os.environ.get("PYTHONPATH")])))
            run_logged([sys.executable, llama / "convert_hf_to_gguf.py", model_dir, "--outtype", "f16", "--outfile",
                        part], log, "convert_hf_to_gguf.py (its requirements: "
                        f"{llama / 'requirements' / 'requirements-convert_hf_to_gguf.txt'})", env, capture=False)
        else:
            run_logged([bindir / "llama-quantize", files["F16"], part, t, jobs], log, f"llama-quantize to {t}",
                       capture=False)
        os.replace(part, out)
        print(f"wrote {out.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return files


def tensor_types(path: Path) -> str:
    """The GGUF's tensor types with their counts, and the token embedding's (tied to the output)."""
    import gguf

    counts: dict[str, int] = {}
    embd = "?"
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        embd = t.tensor_type.name if t.name == "token_embd.weight" else embd
    return ", ".join(f"{n} x {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) + f"; token_embd {embd}"


# ----------------------------------------------------------------------------- measurements

def llama_sample(bindir: Path, gguf: Path, a, log: Path) -> dict:
    """One llama-bench prefill run and one decode run (after a prompt of --prompt-tokens), each a process."""
    base = [bindir / "llama-bench", "-m", gguf, "-t", a.threads, "-r", 1, "-o", "json"]
    out_p, _, rss_p = run_logged(base + ["-p", a.prompt_tokens, "-n", 0], log, "llama-bench (prefill)",
                                 measure_rss=True)
    out_d, _, rss_d = run_logged(base + ["-p", 0, "-n", a.decode_tokens, "-d", a.prompt_tokens], log,
                                 "llama-bench (decode)", measure_rss=True)
    pp, tg = (json.loads(o)[0] for o in (out_p, out_d))  # -o json: the test results alone on stdout
    return {"prefill_tps": pp["avg_ts"], "decode_tps": tg["avg_ts"], "rss_kib": max(rss_p, rss_d),
            "build_commit": pp.get("build_commit"), "cpu_info": pp.get("cpu_info"), "backends": pp.get("backends")}


def llama_perplexity(bindir: Path, gguf: Path, text: Path, a, log: Path) -> float:
    out, err, _ = run_logged([bindir / "llama-perplexity", "-m", gguf, "-f", text, "-c", 512, "--chunks",
                              a.ppl_windows, "-t", a.threads], log, f"llama-perplexity on {gguf.name}")
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out + err)
    if m is None:
        fail(f"llama-perplexity printed no final estimate (log: {log})")
    return float(m.group(1))


def hfquant_run(job: dict, log: Path, measure_rss: bool) -> tuple[dict, int]:
    """Runs this script's worker in a fresh process; returns its result and its peak RSS (KiB)."""
    out, _, rss = run_logged([sys.executable, Path(__file__).resolve(), "--worker", json.dumps(job)], log,
                          f"hfquant worker ({job['mode']} {job['config']})", measure_rss=measure_rss)
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith(RESULT)), None)
    if line is None:
        fail(f"the hfquant worker printed no result (log: {log})")
    return json.loads(line[len(RESULT):]), rss


def worker(job: dict) -> dict:
    """In a fresh process: "prepare" quantizes (and saves) one config and measures its perplexity;
    "time" loads the saved checkpoint and times prefill and decode."""
    import logging

    import torch
    import transformers

    import hfquant  # noqa: F401  (registers the "hfquant" quantization method)
    from hfquant.evaluate import decode_speed, perplexity, prefill_speed, size_on_disk
    from hfquant.evaluate.run_one import CONFIGS, load

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.disable(logging.WARNING)
    torch.set_num_threads(job["threads"])
    base, name, saved = job["model_dir"], job["config"], Path(job["saved"])
    tok = transformers.AutoTokenizer.from_pretrained(base)
    plain = CONFIGS[name][0] == "plain"
    if job["mode"] == "prepare":
        model = load(base, name).eval()
        if not plain:
            hfquant.save_pretrained(model, saved)
        ppl = perplexity(model, tok, data.wikitext_test(), max_length=512, stride=512, max_windows=job["ppl_windows"])
        return {"perplexity": ppl, "size_bytes": size_on_disk(base if plain else saved)}
    model = (load(base, name) if plain else transformers.AutoModelForCausalLM.from_pretrained(saved)).eval()
    pre = prefill_speed(model, tok, prompt_tokens=job["prompt_tokens"], repeats=1)
    dec = decode_speed(model, tok, new_tokens=job["decode_tokens"], prompt_tokens=job["prompt_tokens"], repeats=1)
    return {"prefill_tps": pre, "decode_tps": dec}


# ----------------------------------------------------------------------------- report

def shown(argv: list[str]) -> str:
    """The command line with paths outside the checkout reduced to their names."""
    out = []
    for arg in argv:
        if os.path.isabs(arg.split("=", 1)[-1]):
            head, _, p = arg.rpartition("=") if arg.startswith("--") else ("", "", arg)
            p = Path(p).resolve()
            rel = p.relative_to(ROOT) if p.is_relative_to(ROOT) else Path(p.name)
            arg = f"{head}={rel}" if head else str(rel)
        out.append(arg)
    return " ".join(["python", "benchmarks/bench_llamacpp.py", *out])


def render(res: dict) -> str:
    s, r = res["settings"], res["results"]
    med = {k: {m: statistics.median(x[m] for x in v["samples"]) for m in ("prefill_tps", "decode_tps", "rss_kib")}
           for k, v in r.items()}
    base = {"llama.cpp": r["llama.cpp F16"]["perplexity"], "hfquant": r["hfquant fp32"]["perplexity"]}
    rows, done = [], set()
    for pair, ltype, cfg in PAIRS:
        for engine, name in (("llama.cpp", ltype), ("hfquant", cfg)):
            key = f"{engine} {name}"
            if name is None or key not in r or key in done:
                continue
            done.add(key)
            x, m = r[key], med[key]
            ppl = x["perplexity"]
            label = name if engine == "llama.cpp" else ROWS[name] if ROWS[name].startswith(name) else \
                f"{ROWS[name]} (`{name}`)"
            ratio = ["", ""]
            partner = med.get(f"llama.cpp {ltype}")
            if engine == "hfquant" and partner:
                ratio = [f"{m[k] / partner[k]:.2f}x vs {ltype}" for k in ("prefill_tps", "decode_tps")]
            rows.append([pair, engine, label, f"{x['size_bytes'] / 1e6:.0f}", f"{m['prefill_tps']:.0f}",
                         f"{m['decode_tps']:.1f}", f"{m['rss_kib'] / 1024:.0f}", f"{ppl:.3f}",
                         "(base)" if pair == "float" else f"{100 * (ppl / base[engine] - 1):+.2f}%", *ratio])
    l = res["llamacpp"]
    table = md_table(["pair", "engine", "model", "file (MB)", f"prefill tok/s ({s['prompt_tokens']})",
                      f"decode tok/s ({s['decode_tokens']})", "peak RSS (MiB)", "perplexity (own scoring)",
                      "change vs own float", "prefill hfquant / llama.cpp", "decode hfquant / llama.cpp"],
                     rows, "lllrrrrrrrr")
    types = "; ".join(f"{t}: {v}" for t, v in l["tensor_types"].items())
    return "\n".join([
        "## Side by side with llama.cpp (`benchmarks/bench_llamacpp.py`)", "",
        f"Command: `{res['command']}`", "",
        f"{header_line(res['info'])}. llama.cpp {l['commit'][:12]} as vendored by llama-cpp-python {l['version']} "
        f"(its sdist on the package index), built by the script with CMake (Release, GGML_NATIVE=ON, static"
        f"{''.join(', ' + o for o in l.get('cmake_extra', []))}; "
        f"backends: {l['backends']}); llama-bench names the CPU \"{l['cpu_info']}\". Load average (1 min) "
        f"{res['load_start']:.2f} at the start, {res['load_end']:.2f} at the end; {res['date'][:10]}; "
        f"{res['minutes']:.0f} min in all.", "",
        f"Default model (SmolLM2-135M-Instruct), {s['threads']} threads, medians of {s['rounds']} rounds; every sample "
        "a fresh process, all configs interleaved in each round (starting config rotated). Prefill: one pass over a "
        f"{s['prompt_tokens']}-token prompt (llama-bench pp{s['prompt_tokens']}; hfquant: one forward, "
        f"`hfquant.evaluate.prefill_speed`). Decode: {s['decode_tokens']} greedy tokens at batch 1 after that prompt, "
        f"prefill excluded (llama-bench tg{s['decode_tokens']} at depth {s['prompt_tokens']}; hfquant: "
        "`model.generate` through `hfquant.evaluate.decode_speed`). Peak RSS: ru_maxrss (`os.wait4`) of the process "
        "that loads the model, reads the prompt and decodes (for llama.cpp the larger of its two processes; for "
        "hfquant Python, torch and transformers included). File: the GGUF file; for hfquant the safetensors files "
        "of the saved checkpoint. The float pair sets llama.cpp's F16 weights beside transformers' float32.", "",
        table, "",
        f"Perplexity: WikiText-2 test, the first {s['ppl_windows']} windows of 512 tokens, each engine against its own "
        "float model (llama-perplexity `-c 512`; `hfquant.evaluate.perplexity`, stride 512). llama.cpp scores only the "
        "second half of each window (the first half is context), hfquant every token after the first: the two score "
        "different tokens of each window, so only the relative changes compare, not the perplexities. "
        "Tensor types per file, as llama-quantize chose them (it keeps the token embedding, tied to the output, at "
        "higher precision, and falls back from the k-quants where a row's length is not a multiple of their "
        f"256-element block): {types}.",
    ])


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads of both engines (and build jobs); default 2")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of interleaved samples, medians reported; default 5")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--ppl-windows", type=int, default=8, help="512-token windows of WikiText-2 test; default 8")
    ap.add_argument("--configs", default=",".join(LLAMA_TYPES + HFQ_CONFIGS),
                    help="comma-separated subset of the default (F16 and fp32 always run)")
    ap.add_argument("--llamacpp-src", type=Path, default=None,
                    help="a llama-cpp-python sdist (.tar.gz) or source folder; default: pip download of "
                    f"{LLAMA_CPP_PYTHON}")
    ap.add_argument("--work", type=Path, default=None,
                    help="build and GGUF folder; default <hfquant cache>/llamacpp-<version>")
    ap.add_argument("--cmake-arg", action="append", default=[],
                    help="an extra CMake option for llama.cpp's build (repeatable), after the script's own, e.g. "
                    "-DGGML_NATIVE=OFF with explicit -DGGML_AVX512=ON ... where the native build fails on a CPU; "
                    "each set of options builds into its own folder")
    ap.add_argument("--write-docs", action="store_true", help="write the section 'llamacpp' of --docs")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--json", type=Path, default=None, help="write every sample and setting to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(RESULT + json.dumps(worker(json.loads(a.worker))), flush=True)
        return 0
    for opt in ("threads", "rounds", "prompt_tokens", "decode_tokens", "ppl_windows"):
        if getattr(a, opt) < 1:
            fail(f"--{opt.replace('_', '-')} must be at least 1, got {getattr(a, opt)}")
    known = LLAMA_TYPES + HFQ_CONFIGS
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in known]
    if bad:
        fail(f"unknown --configs {bad}; choose from {','.join(known)}")
    configs = [c for c in known if c in configs or c in ("F16", "fp32")]
    if a.llamacpp_src is not None and not a.llamacpp_src.exists():
        fail(f"--llamacpp-src {a.llamacpp_src} does not exist")

    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    src = a.llamacpp_src.resolve() if a.llamacpp_src else None
    version = LLAMA_CPP_PYTHON if src is None else sdist_version(src)
    work = (a.work or data.cache_dir() / f"llamacpp-{version}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    print(f"work folder {work}; every command's output goes to {log}", flush=True)
    llama = llamacpp_sources(src, work, log)
    commit = llamacpp_commit(llama)
    bindir = build(llama, work, commit, a.threads, work / "build.log", a.cmake_arg)
    model_dir = data.default_model_dir("float32")
    ggufs = make_ggufs(llama, bindir, model_dir, work, [t for t in LLAMA_TYPES if t in configs], a.threads, log)
    text = data.text_path("wiki.test.raw")
    if text is None:
        data.wikitext_test()  # raises the error that says where it looked
    hcfg = [c for c in HFQ_CONFIGS if c in configs]
    job = {"model_dir": str(model_dir), "threads": a.threads, "prompt_tokens": a.prompt_tokens,
           "decode_tokens": a.decode_tokens, "ppl_windows": a.ppl_windows}
    jobs = {c: dict(job, config=c, saved=str(work / "hfquant" / c)) for c in hcfg}

    results: dict[str, dict] = {}
    for t, f in ggufs.items():
        print(f"perplexity: llama.cpp {t}", flush=True)
        results[f"llama.cpp {t}"] = {"file": f.name, "size_bytes": f.stat().st_size, "samples": [],
                                     "perplexity": llama_perplexity(bindir, f, text, a, log)}
    for c in hcfg:  # quantized once per run and saved; perplexity of the quantized model
        print(f"quantize and perplexity: hfquant {c}", flush=True)
        results[f"hfquant {c}"] = dict(hfquant_run(dict(jobs[c], mode="prepare"), log, False)[0], samples=[])

    order = []  # interleaved by pair: F16, fp32, Q8_0, w8, Q4_0, w4g128, ...
    for _, ltype, cfg in PAIRS:
        order += [k for k in (f"llama.cpp {ltype}", f"hfquant {cfg}") if k in results and k not in order]
    llama_facts = {}
    for rnd in range(a.rounds):
        k = rnd % len(order)
        for key in order[k:] + order[:k]:
            engine, name = key.split(" ", 1)
            if engine == "llama.cpp":
                sample = llama_sample(bindir, ggufs[name], a, log)
                llama_facts = {f: sample.pop(f) for f in ("build_commit", "cpu_info", "backends")}
            else:
                sample, rss = hfquant_run(dict(jobs[name], mode="time"), log, True)
                sample["rss_kib"] = rss
            results[key]["samples"].append(sample)
        print(f"round {rnd + 1}/{a.rounds} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    res = {"command": shown(argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "minutes": (time.perf_counter() - t_start) / 60, "load_start": load_start, "load_end": os.getloadavg()[0],
           "settings": dict({k: getattr(a, k) for k in ("threads", "rounds", "prompt_tokens", "decode_tokens",
                                                         "ppl_windows")}, configs=configs),
           "info": system_info(a.threads),
           "llamacpp": {"version": version, "commit": commit, **llama_facts, "cmake_extra": a.cmake_arg,
                        "tensor_types": {t: tensor_types(f) for t, f in ggufs.items()}},
           "results": results}
    body = render(res)
    print(body)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, default=str))
    if a.write_docs:
        write_doc_section(a.docs, "llamacpp", body, "# Benchmarks")
        print(f"wrote the section 'llamacpp' of {a.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
