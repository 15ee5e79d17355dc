"""Installs the ``spatial_mamba`` package.

The CUDA kernels in ``kernels/`` are optional: they are compiled only when asked for with
``SPATIAL_MAMBA_BUILD_CUDA=1`` (``python setup.py build_ext --inplace`` or ``pip install``). Without them the
package uses its Triton kernels on GPUs, or its pure-PyTorch reference ops everywhere.
"""

import os

from setuptools import find_packages, setup


def cuda_extensions():
    if os.environ.get("SPATIAL_MAMBA_BUILD_CUDA", "0") != "1":
        return [], {}
    from kernels.build import cuda_build_plan  # noqa: E402  (needs torch, only imported when building)

    return cuda_build_plan()


ext_modules, cmdclass = cuda_extensions()

setup(
    name="spatial_mamba",
    version="0.1.0",
    description="Spatial-Mamba: visual state space models with structure-aware state fusion (reimplementation)",
    license="Apache-2.0",
    packages=find_packages(include=["spatial_mamba", "spatial_mamba.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "timm>=0.9", "fvcore", "yacs", "pyyaml"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
