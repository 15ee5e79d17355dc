"""Builds the optional CUDA kernels; the package metadata is in ``pyproject.toml``.

The CUDA kernels in ``kernels/`` are compiled only when asked for with ``SPATIAL_MAMBA_BUILD_CUDA=1``
(``python setup.py build_ext --inplace`` or ``pip install``). Without them the package uses its Triton kernels on
GPUs, or its pure-PyTorch reference ops everywhere.
"""

import os

from setuptools import setup


def cuda_extensions():
    if os.environ.get("SPATIAL_MAMBA_BUILD_CUDA", "0") != "1":
        return [], {}
    from kernels.build import cuda_build_plan  # noqa: E402  (needs torch, only imported when building)

    return cuda_build_plan()


ext_modules, cmdclass = cuda_extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
