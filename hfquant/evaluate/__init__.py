"""Measuring a model: perplexity, size, speed."""

__all__ = ["decode_speed", "model_bytes", "perplexity", "perplexity_with_cache", "prefill_speed", "size_on_disk"]


def __getattr__(name: str):
    # metrics imports torch: loaded on first use, so that `hfquant <command> --help` (which reads the
    # config names of run_one) does not wait for it
    if name in __all__:
        from . import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module 'hfquant.evaluate' has no attribute {name!r}")
