"""Helpers shared by the benchmarks: quantizers, cold-weight pools, timing, reports.

Benchmarks only; nothing here is imported by the package. The quantizers are
hfquant.formats' own (the canonical tensors that ``hfquant.ops.repack`` takes; docs/formats.md).
"""
from __future__ import annotations

import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from hfquant import formats

MiB = 1 << 20


# ----------------------------------------------------------------------------- method comparisons

# The accuracy tables compare how methods quantize the weights: their rows run with float
# activations and the token embedding (and a tied lm_head) in float unless a row says otherwise.
# The defaults add int8 activations for prefill and the embedding at 8 bits with fewer weight
# bits; those are measured in their own sections.
WEIGHTS_ALONE_NOTE = (
    "Rows quantize the weights alone: float activations (`hfquant.settings(int8_activations_min_m=None)`) and "
    "the token embedding (with a tied lm_head) in float unless a row says otherwise. The defaults add int8 "
    "activations for prefill (benchmarks.md, int8-activations) and, below 8 bits, the embedding at 8 bits "
    "(README, Measured).")


def weights_alone(settings: dict[str, Any]) -> dict[str, Any]:
    """A comparison row's HfQuantConfig arguments with the embedding left in float unless the row
    sets quantize_embeddings (method "mixed" chooses its own)."""
    if settings.get("method") == "mixed":
        return dict(settings)
    return {"quantize_embeddings": False, **settings}


def float_activations():
    """hfquant.settings with int8 activations off: the weight-only kernels at every call."""
    import hfquant

    return hfquant.settings(int8_activations_min_m=None)


# ----------------------------------------------------------------------------- quantizers

@dataclass
class W4:
    """4-bit weight: canonical checkpoint tensors plus the unsigned codes (for peers)."""

    qweight: torch.Tensor  # uint8 [N, ceil(K/2)], element k in byte k//2, low nibble for even k
    scales: torch.Tensor  # float32 [N, G]
    zeros: torch.Tensor | None  # uint8 [N, G] (asymmetric) or None (symmetric, zero point 8)
    codes: torch.Tensor  # int32 [N, K], 0..15
    group_size: int  # -1 = per row

    def dequantize(self, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """float32 [N, K] = (code - zero) * scale, scales first rounded to scale_dtype."""
        N, K = self.codes.shape
        gs = K if self.group_size == -1 else self.group_size
        gidx = torch.arange(K) // gs
        s = self.scales.to(scale_dtype).float()[:, gidx]
        z = 8.0 if self.zeros is None else self.zeros.float()[:, gidx]
        return (self.codes.float() - z) * s


def quantize_w4(w: torch.Tensor, group_size: int, symmetric: bool = True) -> W4:
    """hfquant's own RTN 4-bit quantization of w [N, K] (hfquant.formats.quantize_rtn), plus
    the unsigned codes the torch int4pack peer takes."""
    q = formats.quantize_rtn(w.float(), 4, group_size, symmetric)
    codes = formats.unpack_int4(q.qweight, w.shape[1]).to(torch.int32)
    return W4(q.qweight, q.scales, q.zeros, codes, group_size)


@dataclass
class W8:
    """8-bit symmetric per-channel weight."""

    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # float32 [N, 1]

    def dequantize(self, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.float() * self.scales.to(scale_dtype).float()


def quantize_w8(w: torch.Tensor) -> W8:
    """hfquant's symmetric per-channel int8 (hfquant.formats.quantize_rtn)."""
    q = formats.quantize_rtn(w.float(), 8, -1, True)
    return W8(q.qweight, q.scales)


# ----------------------------------------------------------------------------- cold weights

class WeightPool:
    """Copies of one weight, read in turn so that each call finds its weight out of cache.

    The copies together hold at least ``cold_bytes`` (several times the L3), and all
    competitors that share the pool share one cursor: a copy is read again only after
    the whole pool (and whatever else ran in between) has passed through the caches.
    """

    def __init__(self, template: Any, bytes_per_copy: int, cold_bytes: int, max_copies: int = 20000):
        """template: a tensor or tuple of tensors (copied in one batch, each copy contiguous),
        or a callable returning a fresh copy (for objects such as modules)."""
        self.bytes_per_copy = bytes_per_copy
        self.n = max(2, min(max_copies, math.ceil(cold_bytes / max(1, bytes_per_copy))))
        if callable(template) and not isinstance(template, torch.Tensor):
            self.copies = [template() for _ in range(self.n)]
        else:
            # One batched copy per tensor instead of n small clones: thousands of tiny clones
            # cost seconds when the OpenMP pool has to synchronise for each of them.
            parts = template if isinstance(template, tuple) else (template,)
            stacked = [t.unsqueeze(0).repeat(self.n, *([1] * t.dim())).unbind(0) for t in parts]
            self.copies = list(zip(*stacked)) if isinstance(template, tuple) else list(stacked[0])
        self.i = 0

    @property
    def total_bytes(self) -> int:
        return self.n * self.bytes_per_copy

    def next(self) -> Any:
        c = self.copies[self.i]
        self.i = self.i + 1 if self.i + 1 < self.n else 0
        return c


def tensor_bytes(*objs: Any) -> int:
    """Sum of nbytes over tensors, recursing into tuples and lists."""
    total = 0
    for o in objs:
        if isinstance(o, torch.Tensor):
            total += o.nbytes
        elif isinstance(o, (tuple, list)):
            total += tensor_bytes(*o)
    return total


# ----------------------------------------------------------------------------- timing

def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of a sample."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def measure_bandwidth(nbytes: int, reps: int) -> dict[str, float]:
    """Read bandwidth (GB/s, 1e9 bytes) of the current torch thread pool over an nbytes buffer.

    Two streaming reductions, interleaved, median of ``reps`` each after one warm-up:
    torch.sum over float32 and amax over the same bytes viewed as uint8. Both need far
    less compute than the memory delivers, so the faster one is taken as "measured".
    """
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    probes = {"sum_f32": lambda: buf.sum(), "amax_u8": lambda: buf.view(torch.uint8).amax()}
    times: dict[str, list[float]] = {k: [] for k in probes}
    for r in range(reps + 1):
        for k, f in probes.items():
            t0 = time.perf_counter()
            f()
            dt = time.perf_counter() - t0
            if r:
                times[k].append(dt)
    out = {k: buf.nbytes / statistics.median(v) / 1e9 for k, v in times.items()}
    out["best"] = max(out.values())
    out["buffer_mib"] = buf.nbytes / MiB
    del buf
    return out


# ----------------------------------------------------------------------------- system facts

class CpuMonitor:
    """CPU time that other processes (and the hypervisor: steal) took while we ran.

    Busy time of all CPUs from /proc/stat minus this process's own CPU time, as a share
    of wall time x logical CPUs. On 2 cores any other busy process distorts threaded
    timings, so the report states it.
    """

    def __init__(self) -> None:
        self.t0, self.own0, self.stat0 = time.perf_counter(), self._own(), self._stat()

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    @staticmethod
    def _stat() -> tuple[float, float] | None:
        try:
            f = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, _idle, _iowait, irq, softirq, steal = f
        return (user + nice + system + irq + softirq) / hz, steal / hz

    def stop(self) -> dict[str, float] | None:
        stat1 = self._stat()
        if self.stat0 is None or stat1 is None:
            return None
        cpu_s = (time.perf_counter() - self.t0) * (os.cpu_count() or 1)
        other = (stat1[0] - self.stat0[0]) - (self._own() - self.own0)
        return {"other_pct": max(0.0, other) / cpu_s * 100, "steal_pct": (stat1[1] - self.stat0[1]) / cpu_s * 100}


def wait_quiet(max_s: float, threshold_pct: float = 5.0, window_s: float = 2.0) -> float | None:
    """Measure other processes' share of the CPUs (%) over window_s; repeat while it is at
    least threshold_pct, for up to max_s. Returns the last share (None without /proc/stat)."""
    deadline = time.perf_counter() + max_s
    while True:
        mon = CpuMonitor()
        time.sleep(window_s)
        o = mon.stop()
        if o is None or o["other_pct"] < threshold_pct or time.perf_counter() >= deadline:
            return None if o is None else o["other_pct"]


def _l3_bytes() -> int | None:
    try:
        for idx in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            if (idx / "level").read_text().strip() == "3":
                size = (idx / "size").read_text().strip()
                m = re.fullmatch(r"(\d+)([KMG]?)", size)
                if m:
                    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]
    except OSError:
        pass
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def system_info(threads: int) -> dict[str, Any]:
    """CPU, hfquant's detected features and active kernel path, torch build facts."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "l3_bytes": _l3_bytes(),
        "threads": threads,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                           "OMP_NUM_THREADS") if k in os.environ},
    }
    try:
        from hfquant._ext import _C

        feats = _C.cpu_features()
        info["hfquant_version"] = getattr(_C, "__version__", "?")
        info["cpu_features"] = [k for k, v in feats.items() if v]
        info["hfquant_isa"] = _C.cpu_isa()
        info["hfquant_int8_path"] = _C.int8_path() if hasattr(_C, "int8_path") else "n/a"
        info["hfquant_isas"] = list(_C.available_isas()) if hasattr(_C, "available_isas") else []
        from hfquant.runtime import Settings, settings

        # every kernel and backend switch (hfquant.settings; HFQUANT_* variables seed it at load)
        info["hfquant_settings"] = settings.as_dict()
        info["hfquant_settings_changed"] = {k: v for k, v in info["hfquant_settings"].items()
                                            if v != Settings.defaults()[k]}
    except Exception as exc:  # the benchmark still runs the torch peers without hfquant
        info["hfquant_error"] = f"{type(exc).__name__}: {exc}"
    return info


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces a run, as a section states it: ``python benchmarks/<script>``
    with the arguments (``argv``, or the process's own when None), shell-quoted."""
    args = sys.argv[1:] if argv is None else argv
    return f"python benchmarks/{Path(script).name}" + "".join(" " + shlex.quote(a) for a in args)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as a report states them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def header_line(info: dict[str, Any]) -> str:
    l3 = f", L3 {info['l3_bytes'] // MiB} MiB" if info.get("l3_bytes") else ""
    if "hfquant_error" in info:
        hq = f"hfquant unavailable ({info['hfquant_error']})"
    else:
        hq = (f"hfquant {info['hfquant_version']} kernel path **{info['hfquant_isa']}** "
              f"(CPU features: {', '.join(info['cpu_features']) or 'none'})")
    env = "".join(f", {k}={v}" for k, v in info["env"].items())
    changed = info.get("hfquant_settings_changed") or {}
    if changed:  # switches away from their defaults change what is measured
        hq += "; hfquant.settings " + ", ".join(f"{k}={v!r}" for k, v in changed.items())
    return (f"CPU: {info['cpu']} ({info['logical_cpus']} logical CPUs{l3}); {hq}; threads {info['threads']}; "
            f"torch {info['torch']} (ATen CPU capability {info['torch_cpu_capability']}{env})")


# ----------------------------------------------------------------------------- reports

def md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A GitHub markdown table; align is one of 'l'/'r' per column (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_doc_section(path: Path, label: str, body: str, intro: str) -> None:
    """Replace the section between the ``label`` markers in path, or append it.

    Markers: ``<!-- bench:<label>:begin -->`` ... ``<!-- bench:<label>:end -->``. A missing
    file is created with ``intro`` first. Text outside the markers is never touched.
    """
    begin, end = f"<!-- bench:{label}:begin -->", f"<!-- bench:{label}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else intro.rstrip() + "\n"
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pat.search(text):
        text = pat.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@dataclass
class Timing:
    """Samples (seconds per call) of one competitor in one case."""

    samples: list[float] = field(default_factory=list)

    def summary_us(self) -> dict[str, float]:
        q1, med, q3 = quartiles(self.samples)
        return {"median_us": med * 1e6, "q1_us": q1 * 1e6, "q3_us": q3 * 1e6, "min_us": min(self.samples) * 1e6}
