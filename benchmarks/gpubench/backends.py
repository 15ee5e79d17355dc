"""Which backend each op runs on, and one backend's implementation of an op."""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from spatial_mamba.ops import backend

# The ops whose backend the model picks per device (``spatial_mamba.ops.backend``).
MODEL_OPS = ("selective_scan", "dwconv2d")


def model_backends(device: torch.device) -> Dict[str, Dict[str, object]]:
    """For each op: the backend the model runs on ``device`` (``default``) and the status of every backend of the GPU
    walk (``backend.CUDA_ORDER``; the CPU kernels are benchmarked by ``benchmarks/fusion_cpu.py``)."""
    probe = torch.zeros(1, device=device)
    status = backend.describe()
    report = {}
    for op in MODEL_OPS:
        try:
            default, note = backend.choose(op, probe)[0], None
        except RuntimeError as error:  # SPATIAL_MAMBA_BACKEND forces a backend that cannot run here
            default, note = None, str(error)
        op_status = status.get(op, {})
        report[op] = {
            "default": default,
            "default_note": note,
            "status": {name: op_status[name] for name in backend.CUDA_ORDER if name in op_status},
        }
    return report


def backend_impl(op: str, name: str, *probe) -> Tuple[Callable | None, str]:
    """(implementation, "") of ``op`` on backend ``name`` for inputs like ``probe``, or (None, why it cannot run)."""
    with backend.force(name):
        try:
            return backend.choose(op, *probe)[1], ""
        except (RuntimeError, KeyError) as error:
            return None, str(error)
