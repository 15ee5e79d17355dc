"""The backends of the custom ops, one package each; importing one registers its kernels with ``..backend``.

- ``cuda``: the compiled CUDA extensions (sources in the repository's ``kernels/``, built by ``setup.py``);
- ``triton``: Triton kernels, each op's launcher (``<op>.py``) beside its kernels (``<op>_kernels.py``);
- ``cpu``: C++ kernels (``*.cpp``) beside their loader, compiled with g++ at their first use.

The pure-PyTorch reference of each op lives with the op itself (``spatial_mamba/ops/<op>.py``).
"""

from . import cpu, cuda, triton

__all__ = ["cpu", "cuda", "triton"]
