"""Custom ops of Spatial-Mamba: the hidden-state selective scan, the structure-aware state fusion (25 taps), alone or
fused with the observation step, and the replicate-padded depthwise convolution.

Each op's public function and its pure-PyTorch reference live in one module here; each backend is one package under
``backends/``, and ``backend.py`` picks one per call (``backend.force``, ``backend.explain``):

=================  ====================  =======================  ===========================  ==================
op                 public op, reference  cuda (sources)           triton                       cpu
=================  ====================  =======================  ===========================  ==================
selective_scan     selective_scan.py     kernels/selective_scan/  selective_scan[_kernels].py  selective_scan.cpp
state_fusion       state_fusion.py       kernels/state_fusion/    state_fusion[_kernels].py    state_fusion.cpp
fused_observation  state_fusion.py       kernels/state_fusion/    state_fusion[_kernels].py    state_fusion.cpp
dwconv2d           dwconv2d.py           kernels/dwconv2d/        dwconv2d[_kernels].py        (the reference)
=================  ====================  =======================  ===========================  ==================

Each backend's Python files are in ``backends/<backend>/`` (``backends/cuda/__init__.py`` loads and registers the
extension built from the repository's ``kernels/``; ``backends/cpu/__init__.py`` compiles, loads and registers the C++
sources beside it).

``selective_scan_export.py`` is the scan as a fixed graph of tensor ops, for ONNX export. Importing this package
registers every backend that exists: the reference always, the compiled CPU kernels (built with g++ at their first
use), the Triton kernels when Triton imports, and the compiled CUDA extension when it was built.
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
from . import backends  # noqa: E402,F401  registers every backend that exists (see backends/__init__.py)
