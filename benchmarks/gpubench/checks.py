"""Whether a backend computes the same function as the reference (scan) or the PyTorch baseline (fusion)."""

from __future__ import annotations

from typing import Dict, Sequence

import torch

# Largest max|actual - expected| / max|expected| a backend may show against the float64 reference (scan) or the
# float32 PyTorch baseline (fusion): fp32 results carry atol 2e-5 of the maximum (tests/kernels/parity.py) and
# the fusion sums 25 fp32 terms in another order; 16-bit gradients add one rounding (one bfloat16 ulp, 2**-7).
CHECK_MAX_REL_DIFF = {"float32": 1e-4, "bfloat16": 2.0**-7 + 1e-4}


def relative_max_diff(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """max over the pairs of max|actual - expected| / max|expected|: a sanity check that a fast kernel computes
    the same function as the reference it is compared with."""
    worst = 0.0
    for a, e in zip(actual, expected):
        e = e.float()
        scale = e.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
        worst = max(worst, ((a.float() - e).abs().max() / scale).item())
    return worst


def judge_difference(diff: float | None, dtype: str) -> Dict[str, object]:
    """The check of a backend's result: its max relative difference, the threshold for ``dtype``, and the verdict."""
    threshold = CHECK_MAX_REL_DIFF[dtype]
    return {"check_threshold": threshold, "check_pass": None if diff is None else bool(diff <= threshold)}


def difference_error(entry: Dict[str, object]) -> ValueError:
    """The error recorded for a result entry whose check failed."""
    diff = next((value for key, value in entry.items() if key.startswith("max_rel_diff_vs_")), None)
    return ValueError(f"result differs by {diff!r} of its maximum, above the threshold {entry['check_threshold']!r}")
