"""Measuring a model: perplexity, size, speed."""
from .metrics import decode_speed, model_bytes, perplexity, perplexity_with_cache, prefill_speed, size_on_disk

__all__ = ["decode_speed", "model_bytes", "perplexity", "perplexity_with_cache", "prefill_speed", "size_on_disk"]
