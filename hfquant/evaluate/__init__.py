"""Measuring a model: perplexity, size, speed."""
from .metrics import decode_speed, model_bytes, perplexity, prefill_speed, size_on_disk

__all__ = ["decode_speed", "model_bytes", "perplexity", "prefill_speed", "size_on_disk"]
