"""Linear-layer shapes of real models, shared by every benchmark in this folder.

Convention used everywhere: ``N`` = out_features (rows of the weight), ``K`` =
in_features (the reduction dimension); ``y[M, N] = x[M, K] @ W[N, K]^T``.
Shapes are derived from each model's config, and modules with the same (N, K) are
merged into one entry (Llama-2-7B's q/k/v/o_proj are all 4096 x 4096).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDims:
    """The config fields that fix a decoder's linear shapes (Llama-style blocks)."""

    key: str  # short name used on the command line
    hf_id: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int


@dataclass(frozen=True)
class LinearShape:
    """One weight shape: ``N`` out_features x ``K`` in_features."""

    name: str  # "<model key>.<modules>", e.g. "llama2-7b.gate_up"
    model: str  # model key
    modules: tuple[str, ...]  # module names in one decoder block with this shape
    N: int  # out_features
    K: int  # in_features

    def describe(self) -> str:
        mods = "/".join(self.modules)
        return f"{self.name} ({mods}: N={self.N} out x K={self.K} in)"


MODELS: dict[str, ModelDims] = {
    # SmolLM2-135M: the project's default test model (config.json of HuggingFaceTB/SmolLM2-135M).
    "smollm2-135m": ModelDims("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", hidden=576, intermediate=1536,
                              heads=9, kv_heads=3, head_dim=64, layers=30, vocab=49152),
    # Llama-2-7B (same linear shapes as LLaMA-1 7B): the usual "7B" reference point.
    "llama2-7b": ModelDims("llama2-7b", "meta-llama/Llama-2-7b-hf", hidden=4096, intermediate=11008,
                           heads=32, kv_heads=32, head_dim=128, layers=32, vocab=32000),
}

DEFAULT_MODEL = "smollm2-135m"


def block_linears(m: ModelDims) -> list[tuple[str, int, int]]:
    """(module, N, K) for every linear layer of one decoder block."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    return [
        ("q_proj", q, m.hidden), ("k_proj", kv, m.hidden), ("v_proj", kv, m.hidden), ("o_proj", m.hidden, q),
        ("gate_proj", m.intermediate, m.hidden), ("up_proj", m.intermediate, m.hidden),
        ("down_proj", m.hidden, m.intermediate),
    ]


def linear_shapes(m: ModelDims) -> list[LinearShape]:
    """The distinct (N, K) shapes of one decoder block, in module order."""
    groups: dict[tuple[int, int], list[str]] = {}
    for mod, n, k in block_linears(m):
        groups.setdefault((n, k), []).append(mod)
    out = []
    for (n, k), mods in groups.items():
        label = "_".join(x.removesuffix("_proj") for x in mods)
        out.append(LinearShape(f"{m.key}.{label}", m.key, tuple(mods), n, k))
    return out


SHAPES: dict[str, LinearShape] = {s.name: s for m in MODELS.values() for s in linear_shapes(m)}


def select(names: list[str] | None) -> list[LinearShape]:
    """Shapes by name; a model key selects all of its shapes; None or ["all"] selects everything."""
    if not names or names == ["all"]:
        return list(SHAPES.values())
    out: list[LinearShape] = []
    for name in names:
        if name in MODELS:
            out += [s for s in SHAPES.values() if s.model == name]
        elif name in SHAPES:
            out.append(SHAPES[name])
        else:
            known = ", ".join([*MODELS, *SHAPES])
            raise ValueError(f"unknown shape or model {name!r}; known: {known}")
    return list(dict.fromkeys(out))  # keep order, drop duplicates


if __name__ == "__main__":
    for s in SHAPES.values():
        print(s.describe())
