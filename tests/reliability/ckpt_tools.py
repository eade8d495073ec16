"""Helpers of the reliability tests: reading and editing checkpoints in place."""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def edit_config(path: str, **changes) -> None:
    f = os.path.join(path, "config.json")
    with open(f) as fh:
        cfg = json.load(fh)
    q = cfg["quantization_config"]
    for k, v in changes.items():
        if v is DELETE:
            q.pop(k, None)
        else:
            q[k] = v
    with open(f, "w") as fh:
        json.dump(cfg, fh)


DELETE = object()
