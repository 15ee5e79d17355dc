"""Custom ops of Spatial-Mamba: the hidden-state selective scan, the structure-aware state fusion (25 taps), alone or
fused with the observation step, and the replicate-padded depthwise convolution.

Importing this package registers every backend that exists: the pure-PyTorch reference always, the compiled CPU
kernels (built with g++ at their first use), the Triton kernels when Triton imports, and the compiled CUDA extension
when it was built.
"""

from . import backend
from .dwconv2d import depthwise_conv2d_replicate
from .selective_scan import selective_scan_fn
from .state_fusion import FUSION_OFFSETS, fused_observation, fusion_taps, merge_state_fusion_kernels, state_fusion

__all__ = [
    "FUSION_OFFSETS",
    "backend",
    "depthwise_conv2d_replicate",
    "fused_observation",
    "fusion_taps",
    "merge_state_fusion_kernels",
    "selective_scan_fn",
    "state_fusion",
]
from . import (
    _cuda,  # noqa: F401  registers the compiled kernels when they were built
    cpu_kernels,  # noqa: F401  registers the compiled CPU kernels (compiled at their first use)
    triton_dwconv2d,  # noqa: F401  registers the Triton kernels when Triton imports
    triton_scan,  # noqa: F401  registers the Triton kernels when Triton imports
    triton_state_fusion,  # noqa: F401  registers the Triton kernels when Triton imports
)
