"""The bits chosen per layer (mixed precision) as a plot and as a table."""
from __future__ import annotations

import os
import re
from collections import Counter


def checkpoint_bits(path: str) -> list[tuple[str, int]]:
    """(module, bits) of every quantized layer of a saved hfquant checkpoint, in file order."""
    import json

    from safetensors import safe_open

    from ..config import HfQuantConfig

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        q = json.load(f).get("quantization_config") or {}
    if q.get("quant_method") != "hfquant":
        raise ValueError(f"hfquant: {path} is not an hfquant checkpoint")
    cfg = HfQuantConfig.from_dict(q)
    names = []
    for fname in sorted(os.listdir(path)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(path, fname), "pt") as f:
                names += [k[: -len(".qweight")] for k in f.keys() if k.endswith(".qweight")]
    return [(n, int(cfg.scheme_for(n)["bits"])) for n in sorted(set(names), key=_order)]


def _order(name: str):
    m = re.search(r"\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def bits_summary(entries: list[tuple[str, int]]) -> str:
    """One line: how many layers got each bit width."""
    c = Counter(b for _, b in entries)
    return ", ".join(f"{n} layers at {b} bits" for b, n in sorted(c.items()))


def plot_bits(entries: list[tuple[str, int]], out: str, title: str = "bits per layer") -> str:
    """Writes a PNG: decoder block on x, bits on y, one series per layer kind (q_proj, ...);
    layers outside the blocks (embeddings, heads) are marked at x = -1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds: dict[str, list[tuple[int, int]]] = {}
    for name, bits in entries:
        m = re.search(r"\.(\d+)\.", name)
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append((int(m.group(1)) if m else -1, bits))
    fig, ax = plt.subplots(figsize=(10, 4))
    n = max(len(kinds), 1)
    for i, (kind, pts) in enumerate(sorted(kinds.items())):
        off = (i - (n - 1) / 2) * 0.8 / n
        ax.scatter([x + off for x, _ in pts], [b + (i - (n - 1) / 2) * 0.06 for _, b in pts], s=18, label=kind)
    ax.set_xlabel("decoder block (-1: outside the blocks)")
    ax.set_ylabel("bits")
    ax.set_yticks(sorted({b for _, b in entries}))
    ax.set_title(f"{title} ({bits_summary(entries)})", fontsize=9)
    ax.legend(fontsize=7, ncol=min(n, 8), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
