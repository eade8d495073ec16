"""Loads the compiled core (hfquant._C), which registers torch.ops.hfquant.*."""
from __future__ import annotations

import torch  # noqa: F401  (the ops library links against torch: import it first)

try:
    from . import _C  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "hfquant's native extension hfquant._C is not built. Install the package with "
        "`pip install --no-build-isolation .` (or run `make install`) in an environment "
        f"that has torch, scikit-build-core and pybind11. Original error: {exc}"
    ) from exc

__all__ = ["_C"]
