"""Loading the checkpoints mmengine writes with torch's ``weights_only`` loader (torch >= 2.6)."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
from mmengine.logging import HistoryBuffer

from spatial_mamba import compat

__all__ = ["allow_mmengine_checkpoints"]


def _history_buffer_statistic(owner: Any, name: str) -> Any:
    """Stands in for ``getattr`` while unpickling: mmengine pickles each ``HistoryBuffer``'s statistics methods as
    ``getattr(HistoryBuffer, 'mean')`` and so on. Only those resolve; a real ``getattr`` would reach any object."""
    # The four built-in statistics, and any registered with HistoryBuffer.register_statistics.
    if owner is HistoryBuffer and name in {"min", "max", "current", "mean", *HistoryBuffer._statistics_methods}:
        return getattr(owner, name)
    raise pickle.UnpicklingError(
        f"checkpoint asks for getattr({owner!r}, {name!r}); only HistoryBuffer statistics methods are allowed"
    )


def allow_mmengine_checkpoints() -> None:
    """Allow-lists for ``torch.load(weights_only=True)`` the non-tensor objects mmengine writes into checkpoints.

    torch >= 2.6 loads with ``weights_only=True`` and mmengine 0.10 does not say otherwise, so its own checkpoints
    (message hub ``HistoryBuffer`` objects holding numpy arrays) fail to load for testing or resuming. Allowing these
    few types keeps the protection against code in downloaded checkpoints, which ``weights_only=False`` would drop.
    """
    numpy_core = getattr(np, "_core", None) or np.core
    scalar_types = [np.float64, np.float32, np.int64, np.int32, np.bool_]
    compat.add_safe_globals(
        [
            HistoryBuffer,
            (_history_buffer_statistic, "builtins.getattr"),
            numpy_core.multiarray._reconstruct,
            numpy_core.multiarray.scalar,
            np.ndarray,
            np.dtype,
            *scalar_types,
            *(type(np.dtype(t)) for t in scalar_types),
        ]
    )
