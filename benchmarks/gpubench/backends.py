"""Which backend each op runs on, and one backend's implementation of an op."""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from spatial_mamba.ops import backend

# The ops whose backend the model picks per device (``spatial_mamba.ops.backend``).
MODEL_OPS = ("selective_scan", "dwconv2d")


def model_backends(device: torch.device) -> Dict[str, Dict[str, object]]:
    """For each op: the backend the model runs on ``device`` (``default``) and every backend's status."""
    probe = torch.zeros(1, device=device)
    status = backend.describe()
    report = {}
    for op in MODEL_OPS:
        try:
            default, note = backend.choose(op, probe)[0], None
        except RuntimeError as error:  # SPATIAL_MAMBA_BACKEND forces a backend that cannot run here
            default, note = None, str(error)
        report[op] = {"default": default, "default_note": note, "status": status.get(op, {})}
    return report


def backend_impl(op: str, name: str, *probe) -> Tuple[Callable | None, str]:
    """(implementation, "") of ``op`` on backend ``name`` for inputs like ``probe``, or (None, why it cannot run)."""
    with backend.force(name):
        try:
            return backend.choose(op, *probe)[1], ""
        except (RuntimeError, KeyError) as error:
            return None, str(error)
