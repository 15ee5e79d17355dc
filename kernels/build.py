"""Build plan of the optional CUDA extensions, used by ``setup.py`` when ``SPATIAL_MAMBA_BUILD_CUDA=1``.

Three extensions are built (sources in this directory, see ``README.md``):

- ``spatial_mamba._selective_scan_cuda``: the hidden-state selective scan for d_state N = 1;
- ``spatial_mamba._dwconv2d_cuda``: the replicate-padded depthwise convolution;
- ``spatial_mamba._state_fusion_cuda``: the one-pass state fusion, alone and fused with the observation step.

The CUDA toolkit is ``$CUDA_HOME`` when set; otherwise it is found from ``nvcc`` on ``PATH``, following symlinks
and wrapper scripts (``torch.utils.cpp_extension`` would take the directory above a wrapper for the toolkit, and
linking then fails with ``cannot find -lcudart``).

Architectures come from ``TORCH_CUDA_ARCH_LIST``; when it is not set, torch builds for the visible GPUs, and with no
GPU visible (how wheels and containers are built) this plan builds for Ampere and Hopper with PTX ("8.0;9.0+PTX"):
sm_80 code runs on every 8.x GPU (A100, A10, L4, L40S, RTX 30xx/40xx), sm_90 on Hopper, and the PTX is compiled by
the driver for anything newer. Each extension records what it was built for (``cuda_archs``, e.g.
``"sm80_sm90_compute90"``); ``spatial_mamba.ops.backends.cuda`` checks it against each tensor's device, so a GPU
the build cannot serve goes to the Triton kernels instead of failing at the first launch.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

__all__ = ["CONVENTIONAL_CUDA_HOME", "DEFAULT_ARCH_LIST", "EXTENSIONS", "cuda_build_plan", "find_cuda_home"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# Where toolkits are installed by convention; tried last.
CONVENTIONAL_CUDA_HOME = Path("/usr/local/cuda")

# Module name -> sources, relative to the repository root (setup.py's directory).
EXTENSIONS: Dict[str, List[str]] = {
    "spatial_mamba._selective_scan_cuda": [
        "kernels/selective_scan/selective_scan.cpp",
        "kernels/selective_scan/selective_scan_fwd.cu",
        "kernels/selective_scan/selective_scan_bwd.cu",
    ],
    "spatial_mamba._dwconv2d_cuda": [
        "kernels/dwconv2d/dwconv2d.cpp",
        "kernels/dwconv2d/dwconv2d_fwd.cu",
        "kernels/dwconv2d/dwconv2d_wgrad.cu",
    ],
    "spatial_mamba._state_fusion_cuda": [
        "kernels/state_fusion/state_fusion.cpp",
        "kernels/state_fusion/state_fusion_kernels.cu",
        "kernels/state_fusion/observation_kernels.cu",
    ],
}

# torch >= 2.6 headers need C++20 (the .cpp bindings include them; the .cu kernels do not).
CXX_FLAGS = ["-O3", "-std=c++20"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++20", "-lineinfo"]

# nvcc wrapper scripts are small; anything bigger is a binary and is not searched for paths.
_MAX_WRAPPER_BYTES = 64 * 1024


def _is_toolkit(path: Path) -> bool:
    libs = [path / "lib64", path / "lib"]
    return (path / "bin" / "nvcc").is_file() and any(lib.is_dir() and any(lib.glob("libcudart*")) for lib in libs)


def _wrapper_targets(nvcc: Path) -> List[Path]:
    """Toolkit directories named in a wrapper script: ``exec /usr/local/cuda-13.0/bin/nvcc "$@"`` names one."""
    try:
        if nvcc.stat().st_size > _MAX_WRAPPER_BYTES:
            return []
        text = nvcc.read_text(errors="ignore")
    except OSError:
        return []
    return [Path(match) for match in re.findall(r"(/[^\s'\"`;:]+)/bin/nvcc\b", text)]


def _toolkit_candidates(nvcc: Path) -> List[Path]:
    """Where the toolkit behind the ``nvcc`` found on PATH may be, most specific first."""
    real = Path(os.path.realpath(nvcc))
    return [
        real.parent.parent,  # nvcc inside the toolkit, or a symlink to it
        *_wrapper_targets(nvcc),  # a wrapper script that names the real nvcc
        nvcc.parent.parent / "cuda",  # the conventional /usr/local/cuda beside a /usr/local/bin wrapper
    ]


def find_cuda_home() -> str:
    """Returns the CUDA toolkit directory (one with ``bin/nvcc`` and ``lib64/libcudart*``).

    ``$CUDA_HOME`` (or ``$CUDA_PATH``) wins when set, and must then be a toolkit. Otherwise ``nvcc`` on ``PATH`` is
    followed to its toolkit, then ``/usr/local/cuda`` is tried. Raises ``RuntimeError`` naming every place it looked.
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(variable)
        if value:
            if _is_toolkit(Path(value)):
                return value
            raise RuntimeError(
                f"{variable}={value} is not a CUDA toolkit: expected {value}/bin/nvcc and {value}/lib64/libcudart*"
            )
    candidates: List[Path] = []
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates += _toolkit_candidates(Path(nvcc))
    candidates.append(CONVENTIONAL_CUDA_HOME)
    looked = []
    for candidate in candidates:
        if str(candidate) in looked:
            continue
        looked.append(str(candidate))
        if _is_toolkit(candidate):
            return str(candidate)
    on_path = f"nvcc on PATH is {nvcc}" if nvcc else "no nvcc on PATH"
    raise RuntimeError(
        f"no CUDA toolkit found ({on_path}; looked for bin/nvcc and lib64/libcudart* in: {', '.join(looked)}). "
        "Set CUDA_HOME to the toolkit directory."
    )


def _default_arch_list():
    """Sets TORCH_CUDA_ARCH_LIST to ``DEFAULT_ARCH_LIST`` when it is unset and no GPU is visible (torch would build for
    every architecture it knows, which takes many times longer)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    import torch

    if torch.cuda.is_available():
        return  # torch builds for the visible GPUs
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    logger.warning(
        "spatial_mamba: TORCH_CUDA_ARCH_LIST is not set and no GPU is visible; building the CUDA kernels for "
        "compute capability %s (set TORCH_CUDA_ARCH_LIST to choose others)",
        DEFAULT_ARCH_LIST,
    )


def _ninja_on_path():
    """torch builds in parallel with ninja when ``ninja`` is on PATH; the pip package may sit in an inactive venv."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def arch_tag(gencode_flags: List[str]) -> str:
    """What nvcc's ``-gencode`` flags build, as one identifier: ``sm80_sm90_compute90`` for sm_80 and sm_90 machine
    code and compute_90 PTX (an identifier, so that it passes through the compilers' command lines unquoted)."""
    codes = set()
    for flag in gencode_flags:
        codes.update(re.findall(r"code=\[?((?:sm|compute)_\d+a?)", flag))
    if not codes:
        raise RuntimeError(f"no CUDA architecture in the build flags {gencode_flags}; set TORCH_CUDA_ARCH_LIST")
    order = sorted(codes, key=lambda code: (code.startswith("compute"), int(re.sub(r"\D", "", code)), code))
    return "_".join(code.replace("_", "") for code in order)


def cuda_build_plan() -> Tuple[list, dict]:
    """Returns ``(ext_modules, cmdclass)`` for ``setup()``: both CUDA extensions and torch's ``BuildExtension``."""
    cuda_home = find_cuda_home()
    os.environ["CUDA_HOME"] = cuda_home
    _default_arch_list()
    _ninja_on_path()
    from torch.utils import cpp_extension

    # cpp_extension reads CUDA_HOME once, at import; it may have been imported (and guessed wrong) before.
    cpp_extension.CUDA_HOME = cuda_home
    # The flags torch will build with, from TORCH_CUDA_ARCH_LIST or the visible GPUs; recorded in each extension.
    archs = f"-DSPATIAL_MAMBA_CUDA_ARCHS={arch_tag(cpp_extension._get_cuda_arch_flags())}"
    ext_modules = [
        cpp_extension.CUDAExtension(
            name,
            sources,
            include_dirs=[str(ROOT / "kernels")],
            extra_compile_args={"cxx": [*CXX_FLAGS, archs], "nvcc": NVCC_FLAGS},
        )
        for name, sources in EXTENSIONS.items()
    ]
    return ext_modules, {"build_ext": cpp_extension.BuildExtension}
