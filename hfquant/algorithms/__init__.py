"""Calibration-based algorithms that prepare a float model for quantization."""
from __future__ import annotations

from .calibration import calibration_batches, run_calibration
from .smoothquant import apply_smoothquant, collect_input_absmax, smooth_model, smoothing_factors

__all__ = ["apply_smoothquant", "calibration_batches", "collect_input_absmax", "run_calibration",
           "smooth_model", "smoothing_factors"]
