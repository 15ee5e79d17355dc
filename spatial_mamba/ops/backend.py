"""Backend choice for the custom ops.

Every op (``selective_scan``, ``dwconv2d``) has up to three implementations, tried in this order:

1. ``cuda``: the compiled extension from ``kernels/`` (``SPATIAL_MAMBA_BUILD_CUDA=1``), for CUDA tensors;
2. ``triton``: Triton kernels, for CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1`` when forced);
3. ``reference``: pure PyTorch, the CPU path and the ground truth of the tests.

``SPATIAL_MAMBA_BACKEND=cuda|triton|reference`` forces one backend for every op; a forced backend that cannot run
raises an error that says why. The backend each op runs on is logged once per process, and falling back to the
reference on a GPU is a warning, never silent.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

__all__ = ["BACKENDS", "register", "choose", "select", "describe", "forced_backend"]

BACKENDS = ("cuda", "triton", "reference")
ENV_VAR = "SPATIAL_MAMBA_BACKEND"

logger = logging.getLogger("spatial_mamba")


@dataclass
class _Impl:
    fn: Callable
    # Returns (available, reason); ``reason`` explains a missing backend (e.g. "extension not built").
    available: Callable[[], Tuple[bool, str]]


_REGISTRY: Dict[str, Dict[str, _Impl]] = {}
_ANNOUNCED: set = set()


def register(op: str, backend: str, fn: Callable, available: Callable[[], Tuple[bool, str]] | None = None):
    """Registers ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, available or (lambda: (True, "always available")))


def forced_backend() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(op: str, backend: str, on_cuda: bool) -> Tuple[bool, str]:
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return False, f"no {backend} implementation of {op} is registered"
    ok, reason = impl.available()
    if not ok:
        return False, reason
    if backend == "cuda" and not on_cuda:
        return False, "the tensors are not on a CUDA device"
    if backend == "triton" and not on_cuda and not _triton_interpret():
        return False, "the tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    return True, reason


def _announce(op: str, backend: str, why: str, warn: bool = False):
    if (op, backend) in _ANNOUNCED:
        return
    _ANNOUNCED.add((op, backend))
    message = f"spatial_mamba: {op} runs on the {backend} backend ({why})"
    if warn:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    logger.info(message)


def choose(op: str, *tensors: torch.Tensor) -> Tuple[str, Callable]:
    """Returns ``(backend name, implementation)`` of ``op`` for ``tensors``."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; registered ops: {sorted(_REGISTRY)}")
    on_cuda = any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    forced = forced_backend()
    if forced is not None:
        ok, reason = _check(op, forced, on_cuda)
        if not ok:
            raise RuntimeError(f"{ENV_VAR}={forced} was asked for, but {op} cannot run on it: {reason}")
        _announce(op, forced, f"forced by {ENV_VAR}")
        return forced, _REGISTRY[op][forced].fn
    if not on_cuda:
        _announce(op, "reference", "CPU tensors")
        return "reference", _REGISTRY[op]["reference"].fn
    reasons = []
    for name in ("cuda", "triton"):
        ok, reason = _check(op, name, on_cuda)
        if ok:
            _announce(op, name, reason)
            return name, _REGISTRY[op][name].fn
        reasons.append(f"{name}: {reason}")
    _announce(op, "reference", "slow path on a GPU; " + "; ".join(reasons), warn=True)
    return "reference", _REGISTRY[op]["reference"].fn


def select(op: str, *tensors: torch.Tensor) -> Callable:
    """Returns the implementation of ``op`` to use for ``tensors`` (see :func:`choose`)."""
    return choose(op, *tensors)[1]


def describe() -> Dict[str, Dict[str, str]]:
    """For each op and backend, whether it is available and why (used by ``python -m spatial_mamba.info``)."""
    report = {}
    for op, impls in sorted(_REGISTRY.items()):
        report[op] = {}
        for backend in BACKENDS:
            impl = impls.get(backend)
            if impl is None:
                report[op][backend] = "not implemented"
                continue
            ok, reason = impl.available()
            report[op][backend] = ("available: " if ok else "unavailable: ") + reason
    return report
