"""Quantized MoE experts on real weights: a Mixtral built from the default (dense) model.

    python benchmarks/moe_from_dense.py [--windows 8] [--experts 4] [--threads 1] [--write-docs]

Each MLP of the default model becomes E experts that are copies of it (fused gate_up_proj /
down_proj), routed top-2 with normalized weights by a random router: whatever the routing,
a token's output is the weighted sum of identical experts, i.e. the dense MLP's output. So
the float MoE has the dense model's perplexity, and since RTN quantizes each expert's rows
exactly as it quantizes the dense layer's, the quantized MoE (hfquant.nn.QuantExperts) has
the quantized dense model's perplexity; a difference would be a fault of the expert path
(layout, routing, activation, weighting). Mixtral, not Qwen3-MoE: Qwen3's attention
normalizes queries and keys per head (q_norm, k_norm), which the dense Llama has not.
--write-docs puts the table in docs/accuracy.md (section moe-from-dense).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import cpu_model, write_doc_section  # noqa: E402

import hfquant  # noqa: E402
from hfquant import HfQuantConfig, data  # noqa: E402
from hfquant.evaluate import perplexity  # noqa: E402
from hfquant.experts import quantized_share  # noqa: E402

SCHEMES = {"W4 g128": dict(bits=4, group_size=128), "W8 per-channel": dict(bits=8, group_size=-1)}


def moe_from_dense(dense, num_experts: int, seed: int = 0):
    """A MixtralForCausalLM whose every MLP is ``num_experts`` copies of the dense one (top-2,
    normalized weights, random router). The expert tensors are expanded views of the dense
    weights: no copy."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    cfg = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters, tie_word_embeddings=c.tie_word_embeddings, sliding_window=None,
        num_local_experts=num_experts, num_experts_per_tok=2, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    with torch.device("meta"):
        moe = MixtralForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in dense.state_dict().items():
        if ".mlp." not in k:
            state[k] = v
    for i, layer in enumerate(dense.model.layers):
        mlp, p = layer.mlp, f"model.layers.{i}.mlp."
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
        state[p + "experts.gate_up_proj"] = gate_up[None].expand(num_experts, *gate_up.shape)
        down = mlp.down_proj.weight.detach()
        state[p + "experts.down_proj"] = down[None].expand(num_experts, *down.shape)
        state[p + "gate.weight"] = torch.randn(num_experts, c.hidden_size, generator=g) * 0.1
    missing, unexpected = moe.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (c.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"moe_from_dense: missing {missing}, unexpected {unexpected}")
    if c.tie_word_embeddings:
        moe.lm_head.weight = moe.model.embed_tokens.weight
    moe.model.rotary_emb = dense.model.rotary_emb  # its inv_freq buffer (not in the state dict)
    left = [n for n, t in [*moe.named_parameters(), *moe.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"moe_from_dense: not set from the dense model: {left[:4]}")
    return moe.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    md = str(data.default_model_dir("float32"))
    tok = AutoTokenizer.from_pretrained(md)
    text = data.wikitext_test()
    dense = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32).eval()
    t0 = time.time()

    def ppl(model):
        with common.float_activations():
            return perplexity(model, tok, text, max_length=512, stride=512, max_windows=a.windows)

    rows = [("float", ppl(dense), ppl(moe_from_dense(dense, a.experts)), None)]
    print(f"float: dense {rows[0][1]:.6f}  moe {rows[0][2]:.6f}", flush=True)
    for label, scheme in SCHEMES.items():
        scheme = common.weights_alone(scheme)
        d = ppl(hfquant.quantize_model(copy.deepcopy(dense), HfQuantConfig(**scheme)))
        moe = hfquant.quantize_model(moe_from_dense(dense, a.experts), HfQuantConfig(**scheme))
        done, total = quantized_share(moe)
        rows.append((label, d, ppl(moe), done / total))
        del moe
        print(f"{label}: dense {d:.6f}  moe {rows[-1][2]:.6f}  quantized share {done / total:.4f}", flush=True)
    worst = max(abs(m / d - 1) for _, d, m, _ in rows)
    body = "\n".join([
        "### Quantized MoE experts on real weights (Mixtral built from the default model)", "",
        f"Command: `python benchmarks/moe_from_dense.py --windows {a.windows} --experts {a.experts} --write-docs`", "",
        f"Each MLP of the default model (fp32) becomes {a.experts} experts that are copies of it, routed top-2 with "
        "normalized weights by a random router, so the MoE computes the dense model: its perplexity must equal the "
        "dense model's, in float and (RTN quantizes every expert's rows as it quantizes the dense layer's) quantized, "
        "where the experts run as `hfquant.nn.QuantExperts`. Perplexity on "
        f"{a.windows} windows of 512 tokens of WikiText-2 test; {a.threads} thread(s), {cpu_model()}; run "
        f"{datetime.date.today().isoformat()}, {time.time() - t0:.0f} s.", "",
        "| weights | dense model | MoE of copies | relative difference | quantized share of MoE weights |",
        "|---|---|---|---|---|"]
        + [f"| {lab} | {d:.6f} | {m:.6f} | {m / d - 1:+.2e} | {'-' if s is None else f'{100 * s:.2f}%'} |"
           for lab, d, m, s in rows]
        + ["", f"Largest relative difference: {worst:.1e} (float rounding: the routing weights of two identical "
           "experts sum to 1 up to rounding, and the expert kernel sums rows in another order)."])
    print(body)
    if a.write_docs:
        write_doc_section(Path(__file__).resolve().parent.parent / "docs" / "accuracy.md", "moe-from-dense",
                          body, "# Accuracy")
    if worst > 1e-4:
        raise SystemExit(f"moe_from_dense: the MoE's perplexity differs from the dense model's by {worst:.1e} "
                         "relative (more than 1e-4)")


if __name__ == "__main__":
    main()
