"""Checkpoints of today's format load unchanged: the quantization_config dicts that
HfQuantConfig wrote before the method registry (tests/formats/data/configs_format_v1.json, one
per method and setting family, written by the previous HfQuantConfig) read back into the same
config: same to_dict, same short name, same quantize-on-load or calibrate decision."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfquant import HfQuantConfig

CASES = json.loads((Path(__file__).parent / "data" / "configs_format_v1.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c['short_name']}" for i, c in enumerate(CASES)])
def test_saved_config_reads_back_the_same(case):
    cfg = HfQuantConfig.from_dict(dict(case["config"]))
    # a saved config without quantize_embeddings did not quantize them, whatever the method's default
    assert cfg.quantize_embeddings == case["config"].get("quantize_embeddings", False)
    saved = cfg.to_dict()
    if saved.get("quantize_embeddings") is False:  # now written out where it is not the default
        del saved["quantize_embeddings"]
    # settings added since (rtn's grid, zero_point) mean in version 1 what version 1 had
    assert not set(cfg.impl.version1_settings) & set(saved)  # not named in a version 1 config
    assert saved == case["config"]
    assert cfg.short_name == case["short_name"]
    assert cfg.needs_float_model == case["needs_float_model"]
    # and once more through JSON, as save_pretrained / from_pretrained do
    again = HfQuantConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again.to_dict() == cfg.to_dict()


def test_every_method_is_covered():
    from hfquant.methods import method_names

    covered = {c["config"]["method"] for c in CASES}
    builtin = {"rtn", "gptq", "awq", "llm_int8", "w8a8", "kmeans", "mixed"}
    assert builtin <= covered and builtin <= set(method_names())
