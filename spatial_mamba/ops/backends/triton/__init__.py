"""The ``triton`` backend: each op's launcher (``<op>.py``) registers its kernels (``<op>_kernels.py``) when Triton
imports."""

from . import dwconv2d, selective_scan, state_fusion

__all__ = ["dwconv2d", "selective_scan", "state_fusion"]
