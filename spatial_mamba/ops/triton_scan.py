"""Triton backend of the hidden-state selective scan, for d_state N = 1 (paper Eq. 2-3; the official
``kernels/selective_scan``).

It runs on CUDA tensors when the CUDA extension in ``kernels/`` is not built, so a user without a compiler still gets
a fast model. Under ``TRITON_INTERPRET=1`` with ``SPATIAL_MAMBA_BACKEND=triton`` it also runs on CPU tensors, through
Triton's interpreter: that is how the tests check it on machines without a GPU. The kernels themselves live in
``_triton_scan_kernels.py``. Importing this module never needs Triton; the backend reports itself unavailable when
Triton is missing or too old.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Tuple

import torch

from . import backend

__all__ = ["selective_scan_triton", "available", "triton_is_interpreted"]

MIN_TRITON_VERSION = (3, 0)
# Launch shape: a program scans tiles of BLOCK_D channels x BLOCK_L positions, BLOCK_D * BLOCK_L = TILE_ELEMENTS where
# the input is large enough, and walks longer sequences tile by tile with the state carried over. Short sequences get
# more channels per program. 512 elements over 4 warps (4 per thread) compile for sm_90 to at most 48 registers
# forward and 88 backward, without spills (tests/ops/test_triton_scan.py checks the spills), and at least 2 channels
# per program halve the dB atomics of the backward pass. Not tuned on a GPU yet.
MAX_BLOCK_L = 256
TILE_ELEMENTS = 512
NUM_WARPS = 4


@functools.cache
def _installed() -> Tuple[bool, str]:
    try:
        import triton
    except ImportError:
        return False, "triton is not installed"
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if version < MIN_TRITON_VERSION:
        needed = ".".join(map(str, MIN_TRITON_VERSION))
        return False, f"triton {triton.__version__} is installed, but the kernels need triton >= {needed}"
    return True, f"triton {triton.__version__}"


def triton_is_interpreted() -> bool:
    """Whether Triton was imported under TRITON_INTERPRET=1.

    Triton reads the variable once, when it is imported: its own library functions (``tl.zeros``, ``tl.sum``, ...)
    are decorated then, and a kernel cannot run in the other mode. Importing spatial_mamba imports Triton (through
    timm and torchvision), so the variable must be set before that.
    """
    import triton.language as tl

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a Triton without the interpreter class cannot be in interpreter mode
        return False
    return isinstance(tl.zeros, InterpretedFunction)


def available() -> Tuple[bool, str]:
    ok, reason = _installed()
    if not ok:
        return ok, reason
    interpret = backend._triton_interpret()
    if interpret != triton_is_interpreted():
        if interpret:
            return False, (
                "TRITON_INTERPRET=1 was set after triton was imported (importing spatial_mamba imports it), and "
                "Triton reads it only at import: set it before starting Python"
            )
        return False, "triton was imported with TRITON_INTERPRET=1, which is no longer set"
    return True, reason


def _kernels():
    from . import _triton_scan_kernels

    return _triton_scan_kernels


def _launch_config(u: torch.Tensor):
    """Returns (kernels, grid, launch options) for u of shape (batch, channels, length)."""
    import triton

    batch, n_channels, length = u.shape
    block_l = max(16, min(triton.next_power_of_2(length), MAX_BLOCK_L))
    block_d = min(triton.next_power_of_2(n_channels), max(1, TILE_ELEMENTS // block_l))
    grid = (batch, triton.cdiv(n_channels, block_d))
    options = dict(BLOCK_D=block_d, BLOCK_L=block_l, num_warps=NUM_WARPS)
    return _kernels(), grid, options


def _device_guard(tensor: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, delta_bias, delta_softplus):
        batch, n_channels, length = u.shape
        kernels, grid, options = _launch_config(u)
        hs = torch.empty((batch, n_channels, 1, length), device=u.device, dtype=torch.float32)
        with _device_guard(u):
            kernels.selective_scan_fwd_kernel[grid](
                u,
                delta,
                A,
                B,
                A if delta_bias is None else delta_bias,  # never read without a bias
                hs,
                n_channels,
                length,
                HAS_DELTA_BIAS=delta_bias is not None,
                DELTA_SOFTPLUS=delta_softplus,
                **options,
            )
        ctx.save_for_backward(u, delta, A, B, delta_bias, hs)
        ctx.delta_softplus = delta_softplus
        return hs

    @staticmethod
    def backward(ctx, dhs):
        u, delta, A, B, delta_bias, hs = ctx.saved_tensors
        batch, n_channels, length = u.shape
        kernels, grid, options = _launch_config(u)
        dhs = dhs.to(torch.float32).contiguous()
        du = torch.empty_like(u)
        ddelta = torch.empty_like(delta)
        dA_partial = torch.empty((batch, n_channels), device=u.device, dtype=torch.float32)
        dB = torch.zeros((batch, length), device=u.device, dtype=torch.float32)
        ddelta_bias_partial = None if delta_bias is None else torch.empty_like(dA_partial)
        with _device_guard(u):
            kernels.selective_scan_bwd_kernel[grid](
                u,
                delta,
                A,
                B,
                A if delta_bias is None else delta_bias,
                hs,
                dhs,
                du,
                ddelta,
                dA_partial,
                dB,
                dA_partial if delta_bias is None else ddelta_bias_partial,  # never written without a bias
                n_channels,
                length,
                HAS_DELTA_BIAS=delta_bias is not None,
                DELTA_SOFTPLUS=ctx.delta_softplus,
                **options,
            )
        dA = dA_partial.sum(0).view_as(A).to(A.dtype)
        dB = dB.view_as(B).to(B.dtype)
        ddelta_bias = None if delta_bias is None else ddelta_bias_partial.sum(0).to(delta_bias.dtype)
        return du, ddelta, dA, dB, ddelta_bias, None


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Hidden states hs (batch, D, 1, L) in fp32 of x_t = exp(Δ_t A) x_{t-1} + Δ_t B_t u_t, x_{-1} = 0.

    The backend signature of ``backend.select("selective_scan", ...)``: u, delta (batch, D, L) in fp32/fp16/bf16,
    A (D, 1) fp32, B (batch, 1, L) in u's dtype, delta_bias (D,) fp32 or None. Differentiable w.r.t. u, delta, A, B
    and delta_bias, with gradients in the input dtypes.
    """
    if A.dim() != 2 or A.shape[1] != 1:
        raise ValueError(
            f"the Triton selective scan supports d_state N = 1 only, got A of shape {tuple(A.shape)}; "
            "use SPATIAL_MAMBA_BACKEND=reference for N > 1"
        )
    return _SelectiveScanTriton.apply(
        u.contiguous(),
        delta.contiguous(),
        A.contiguous(),
        B.contiguous(),
        None if delta_bias is None else delta_bias.contiguous(),
        bool(delta_softplus),
    )


def supports(u=None, delta=None, A=None, B=None, delta_bias=None, *rest):
    """Why the Triton scan cannot take these inputs (the same limits as the CUDA kernels: N = 1, 16/32-bit floats)."""
    from ._cuda import supports_selective_scan

    return supports_selective_scan(u, delta, A, B, delta_bias)


backend.register("selective_scan", "triton", selective_scan_triton, available, supports=supports)
