"""What a GPU test does when the CUDA kernels are not there.

Without a GPU it skips. With one, a missing or unloadable extension is a failure, naming why, so that a GPU run
cannot report green with nothing executed; ``SPATIAL_MAMBA_ALLOW_MISSING_CUDA=1`` turns that failure into a skip
(a GPU machine that only runs the Triton or reference backends).
"""

from __future__ import annotations

import os

import pytest
import torch

from spatial_mamba.ops import backend

ALLOW_MISSING = "SPATIAL_MAMBA_ALLOW_MISSING_CUDA"
CUDA_OPS = ("selective_scan", "dwconv2d", "state_fusion", "fused_observation")


def require_cuda_kernels(*ops: str) -> None:
    """Skips without a GPU; on a GPU, fails (or skips, when allowed) unless every op of ``ops`` has its kernels."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    missing = {op: why for op in ops or CUDA_OPS for ok, why in [backend.is_available(op, "cuda")] if not ok}
    if not missing:
        return
    why = "; ".join(f"{op}: {reason}" for op, reason in missing.items())
    if os.environ.get(ALLOW_MISSING, "") == "1":
        pytest.skip(f"the CUDA kernels are missing ({why}), allowed by {ALLOW_MISSING}=1")
    pytest.fail(
        f"a GPU is present but the CUDA kernels are not ({why}); build them, or set {ALLOW_MISSING}=1 to skip",
        pytrace=False,
    )
