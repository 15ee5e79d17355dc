"""Triton backend of the hidden-state selective scan, for d_state N = 1 (paper Eq. 2-3; the official
``kernels/selective_scan``).

It runs on CUDA tensors when the CUDA extension in ``kernels/`` is not built, so a user without a compiler still gets
a fast model. Under ``TRITON_INTERPRET=1`` with ``SPATIAL_MAMBA_BACKEND=triton`` it also runs on CPU tensors, through
Triton's interpreter: that is how the tests check it on machines without a GPU. The kernels themselves live in
``selective_scan_kernels.py``. Importing this module never needs Triton; the backend reports itself unavailable when
Triton is missing or too old.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Tuple

import torch

from ... import backend

__all__ = ["selective_scan_triton", "available", "split_segments", "triton_is_interpreted"]

MIN_TRITON_VERSION = (3, 0)
# Launch shape: a program scans tiles of BLOCK_D channels x BLOCK_L positions, BLOCK_D * BLOCK_L = TILE_ELEMENTS where
# the input is large enough, and walks longer sequences tile by tile with the state carried over. Short sequences get
# more channels per program. 512 elements over 4 warps (4 per thread) compile for sm_90 to at most 48 registers
# forward and 88 backward, without spills (tests/ops/test_triton_scan.py checks the spills), and at least 2 channels
# per program halve the dB partial rows of the backward pass. Not tuned on a GPU yet.
MAX_BLOCK_L = 256
TILE_ELEMENTS = 512
NUM_WARPS = 4
# Split rows: with fewer than SPLIT_PROGRAMS_PER_SM programs per SM (16 warps, as the CUDA kernels' rule), rows of at
# least two SPLIT_MIN_SEGMENT positions are cut into segments scanned by programs of their own (at most MAX_SEGMENTS:
# each program composes the segments before its own in a loop). The detection shape (batch 2, D 128, 66,600 tokens)
# has 128 programs of 2 channels: 4 segments on a 132-SM H100/H200.
SPLIT_PROGRAMS_PER_SM = 4
SPLIT_MIN_SEGMENT = 2048
MAX_SEGMENTS = 32


@functools.cache
def triton_installed() -> Tuple[bool, str]:
    """(usable, why): Triton is installed in a release the kernels support (every Triton backend needs this)."""
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
    ok, reason = triton_installed()
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
    from . import selective_scan_kernels as _triton_scan_kernels

    return _triton_scan_kernels


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _tile(n_channels: int, length: int) -> Tuple[int, int]:
    """(BLOCK_D, BLOCK_L) of the programs for rows of ``length`` positions."""
    block_l = max(16, min(_next_power_of_2(length), MAX_BLOCK_L))
    return min(_next_power_of_2(n_channels), max(1, TILE_ELEMENTS // block_l)), block_l


def segment_length(length: int, segments: int) -> int:
    """Positions per segment (whole chunks of the kernels) when rows of ``length`` are cut into ``segments``."""
    _, block_l = _tile(1, length)
    return _cdiv(_cdiv(length, segments), block_l) * block_l


def split_segments(batch: int, n_channels: int, length: int, sm_count: int) -> int:
    """Segments per row for (batch, n_channels, length) inputs on a GPU with ``sm_count`` SMs.

    As many as keep the programs ((batch, channel block) programs x segments) within ``SPLIT_PROGRAMS_PER_SM`` per SM,
    so that they run in one wave, each segment at least ``SPLIT_MIN_SEGMENT`` long, at most ``MAX_SEGMENTS``; 1 when
    that is 1. Segments are whole chunks; the last one may be shorter.
    """
    for name, value in (("batch", batch), ("n_channels", n_channels), ("length", length), ("sm_count", sm_count)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"split_segments: {name} must be a non-negative int; got {value!r}")
    block_d, _ = _tile(n_channels, length)
    programs = batch * _cdiv(n_channels, block_d)
    target = SPLIT_PROGRAMS_PER_SM * sm_count
    if programs == 0 or length == 0 or programs >= target:
        return 1
    segments = min(target // programs, length // SPLIT_MIN_SEGMENT, MAX_SEGMENTS)
    if segments <= 1:
        return 1
    # Whole chunks per segment can leave fewer, non-empty segments: count those.
    return _cdiv(length, segment_length(length, segments))


def _device_segments(u: torch.Tensor) -> int:
    if not u.is_cuda:  # Triton's interpreter on CPU tensors: whole rows unless asked otherwise
        return 1
    sm_count = torch.cuda.get_device_properties(u.device).multi_processor_count
    return split_segments(*u.shape, sm_count)


def _launch_config(u: torch.Tensor, segments: int = 1):
    """Returns (kernels, grid, launch options, segment length) for u of shape (batch, channels, length) with rows cut
    into ``segments`` segments (the grid's third axis)."""
    batch, n_channels, length = u.shape
    block_d, block_l = _tile(n_channels, length)
    piece = segment_length(length, segments) if length else 0
    if segments != 1 and not (1 < segments <= MAX_SEGMENTS and _cdiv(length, piece) == segments):
        raise ValueError(
            f"selective_scan (triton): rows of {length} positions cannot be cut into {segments} segments of whole "
            f"{block_l}-position chunks (at most {MAX_SEGMENTS}; see split_segments)"
        )
    grid = (batch, _cdiv(n_channels, block_d), segments)
    options = dict(BLOCK_D=block_d, BLOCK_L=block_l, num_warps=NUM_WARPS)
    return _kernels(), grid, options, piece


def _device_guard(tensor: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _segment_totals(u: torch.Tensor, segments: int) -> torch.Tensor:
    """The (batch, channels, segments, 2) float32 buffer of the segments' composite maps (a placeholder when rows are
    whole: the kernels do not read it then)."""
    shape = (*u.shape[:2], segments, 2) if segments > 1 else (1,)
    return torch.empty(shape, device=u.device, dtype=torch.float32)


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, delta_bias, delta_softplus, segments=None):
        batch, n_channels, length = u.shape
        if segments is None:
            segments = _device_segments(u)
        kernels, grid, options, piece = _launch_config(u, segments)
        hs = torch.empty((batch, n_channels, 1, length), device=u.device, dtype=torch.float32)
        totals = _segment_totals(u, segments)
        bias = A if delta_bias is None else delta_bias  # never read without a bias
        flags = dict(HAS_DELTA_BIAS=delta_bias is not None, DELTA_SOFTPLUS=delta_softplus, **options)
        with _device_guard(u):
            if segments > 1:
                kernels.selective_scan_fwd_totals_kernel[(*grid[:2], segments - 1)](
                    u, delta, A, B, bias, totals, n_channels, length, piece, segments, **flags
                )
            kernels.selective_scan_fwd_kernel[grid](
                u, delta, A, B, bias, hs, totals, n_channels, length, piece, segments, **flags
            )
        ctx.save_for_backward(u, delta, A, B, delta_bias, hs)
        ctx.delta_softplus = delta_softplus
        ctx.segments = segments
        return hs

    @staticmethod
    def backward(ctx, dhs):
        u, delta, A, B, delta_bias, hs = ctx.saved_tensors
        batch, n_channels, length = u.shape
        segments = ctx.segments
        kernels, grid, options, piece = _launch_config(u, segments)
        dhs = dhs.to(torch.float32).contiguous()
        du = torch.empty_like(u)
        ddelta = torch.empty_like(delta)
        dA_partial = torch.empty((segments, batch, n_channels), device=u.device, dtype=torch.float32)
        # One row of dB per channel block, every position written by the segment holding it; summed below in a fixed
        # order, so that the backward is deterministic.
        dB_partial = torch.empty((batch, grid[1], length), device=u.device, dtype=torch.float32)
        ddelta_bias_partial = None if delta_bias is None else torch.empty_like(dA_partial)
        totals = _segment_totals(u, segments)
        bias = A if delta_bias is None else delta_bias
        flags = dict(HAS_DELTA_BIAS=delta_bias is not None, DELTA_SOFTPLUS=ctx.delta_softplus, **options)
        with _device_guard(u):
            if segments > 1:
                kernels.selective_scan_bwd_totals_kernel[(*grid[:2], segments - 1)](
                    delta, A, bias, dhs, totals, n_channels, length, piece, segments, **flags
                )
            kernels.selective_scan_bwd_kernel[grid](
                u,
                delta,
                A,
                B,
                bias,
                hs,
                dhs,
                du,
                ddelta,
                dA_partial,
                dB_partial,
                dA_partial if delta_bias is None else ddelta_bias_partial,  # never written without a bias
                totals,
                n_channels,
                length,
                piece,
                segments,
                **flags,
            )
        dA = dA_partial.sum((0, 1)).view_as(A).to(A.dtype)
        dB = dB_partial.sum(1).view_as(B).to(B.dtype)
        ddelta_bias = None if delta_bias is None else ddelta_bias_partial.sum((0, 1)).to(delta_bias.dtype)
        return du, ddelta, dA, dB, ddelta_bias, None, None


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
    from ..cuda import supports_selective_scan

    return supports_selective_scan(u, delta, A, B, delta_bias)


backend.register("selective_scan", "triton", selective_scan_triton, available, supports=supports)
