"""Triton backends of the one-pass state fusion op ``state_fusion`` (``fn(h, taps) -> out``) and of the fused
observation op ``fused_observation`` (``fn(h, taps, C, u, D) -> y``).

out[b, c, y, x] = Σ_k taps[c, k] h[b, c, clamp(y + dy_k, 0, H - 1), clamp(x + dx_k, 0, W - 1)] over the 25 distinct
taps of the three dilated 3x3 kernels of the structure-aware state fusion (paper Eq. 4; the official
``classification/models/spatialmamba.py``, ``StateFusion``), with replicate borders. One pass serves training and
evaluation: the three dilated convolutions and the merged 11x11 kernel are the same function.

h: (B, C, H, W) contiguous float32, float16 or bfloat16; taps: (C, 25) float32. Returns h's dtype, computed in
float32; differentiable w.r.t. h (the adjoint folds the gradient of every clamped read onto the border pixel it read)
and taps. Like the other Triton backends it runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``
when forced (the tests). Importing this module never needs Triton.

The fused observation (the paper's equation for y_t with d_state N = 1) runs the fusion with the observation step as
its epilogue: y[b, c] = out[b, c]·C[b] + D[c]·u[b, c], so the fused states are never written: the forward pass reads h
and u and writes y (12 B/element in fp32, against 20 for the fusion followed by the observation in PyTorch). C and u
share one dtype, float32, float16 or bfloat16, which may differ from h's; y has h's dtype. Its backward pass, with
dF = dy·C: dh is the fusion's adjoint of dF (borders folded as above), dtaps[c, k] = Σ dF·h[shifted], dC = Σ_c dy·out,
du = D·dy and dD[c] = Σ dy·u; sums over programs go through per-program partial buffers summed here (no atomics, so
the results are deterministic).
"""

from __future__ import annotations

import torch

from ... import backend
from ..cuda import KERNEL_DTYPES, supports_state_fusion
from .selective_scan import _device_guard, available

__all__ = ["N_TAPS", "fused_observation_triton", "state_fusion_triton", "supports", "supports_observation"]

N_TAPS = 25
# Output tile of one program: up to 64 columns (the widest Spatial-Mamba maps at 224 are 56 wide), rows up to
# TILE_ELEMENTS in all; the border kernel takes BORDER_BLOCK border pixels per program. Not tuned on a GPU yet.
MAX_BLOCK_W = 64
TILE_ELEMENTS = 512
BORDER_BLOCK = 128
NUM_WARPS = 4
# Channels one program of the fused observation's backward pass loops over, summing dC over them: each writes a float32
# dC partial for its batch element, group and tile, ceil(channels / CHANNEL_GROUP) planes per batch element, which the
# backward sums. Without dC, one channel per program.
CHANNEL_GROUP = 16


def _kernels():
    from . import state_fusion_kernels as _triton_state_fusion_kernels

    return _triton_state_fusion_kernels


def _tiling(planes: int, height: int, width: int):
    """(grid, BLOCK_H, BLOCK_W) for ``planes`` planes of height x width."""
    import triton

    block_w = min(triton.next_power_of_2(width), MAX_BLOCK_W)
    block_h = min(triton.next_power_of_2(height), max(1, TILE_ELEMENTS // block_w))
    return (planes, triton.cdiv(height, block_h), triton.cdiv(width, block_w)), block_h, block_w


def border_pixels(height: int, width: int) -> int:
    """How many pixels of a height x width plane lie on its border."""
    return width * min(height, 2) + max(height - 2, 0) * min(width, 2)


def _border_dgrad(kernels, taps, dy, scale, dh):
    """Overwrites dh on the border pixels with the adjoint of dy (dy·scale, scale (B, H, W), when given)."""
    batch, channels, height, width = dh.shape
    n_border = border_pixels(height, width)
    kernels.state_fusion_dgrad_border_kernel[(batch * channels, -(-n_border // BORDER_BLOCK))](
        taps,
        dy,
        dy if scale is None else scale,  # never read without SCALED
        dh,
        channels,
        height,
        width,
        n_border,
        SCALED=scale is not None,
        BLOCK=BORDER_BLOCK,
        num_warps=NUM_WARPS,
    )


class _StateFusionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, taps):
        batch, channels, height, width = h.shape
        grid, block_h, block_w = _tiling(batch * channels, height, width)
        out = torch.empty_like(h)
        if h.numel():
            with _device_guard(h):
                _kernels().state_fusion_fwd_kernel[grid](
                    h, taps, out, channels, height, width, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=NUM_WARPS
                )
        ctx.save_for_backward(h, taps)
        return out

    @staticmethod
    def backward(ctx, dy):
        h, taps = ctx.saved_tensors
        need_dh, need_dtaps = ctx.needs_input_grad[:2]
        batch, channels, height, width = h.shape
        dy = dy.to(h.dtype).contiguous()
        grid, block_h, block_w = _tiling(batch * channels, height, width)
        dh = torch.empty_like(h) if need_dh else None
        partial = None
        if need_dtaps:
            partial = torch.empty((batch, channels, grid[1] * grid[2], N_TAPS), device=h.device, dtype=torch.float32)
        if h.numel():
            kernels = _kernels()
            with _device_guard(h):
                kernels.state_fusion_bwd_kernel[grid](
                    h,
                    taps,
                    dy,
                    dh if need_dh else dy,  # never written without NEED_DH
                    partial if need_dtaps else taps,  # never written without NEED_DTAPS
                    channels,
                    height,
                    width,
                    NEED_DH=need_dh,
                    NEED_DTAPS=need_dtaps,
                    BLOCK_H=block_h,
                    BLOCK_W=block_w,
                    num_warps=NUM_WARPS,
                )
                if need_dh:
                    # Launched after the tile kernel on the same stream: it overwrites the border pixels.
                    _border_dgrad(kernels, taps, dy, None, dh)
        dtaps = None
        if need_dtaps:
            dtaps = partial.sum((0, 2)) if h.numel() else torch.zeros_like(taps)
        return dh, dtaps


class _FusedObservationTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, taps, C, u, D):
        batch, channels, height, width = h.shape
        grid, block_h, block_w = _tiling(batch * channels, height, width)
        y = torch.empty_like(h)
        if h.numel():
            with _device_guard(h):
                _kernels().fused_observation_fwd_kernel[grid](
                    h, taps, C, u, D, y, channels, height, width, BLOCK_H=block_h, BLOCK_W=block_w, num_warps=NUM_WARPS
                )
        ctx.save_for_backward(h, taps, C, u, D)
        return y

    @staticmethod
    def backward(ctx, dy):
        h, taps, C, u, D = ctx.saved_tensors
        need_dh, need_dtaps, need_dc, need_du, need_dd = ctx.needs_input_grad[:5]
        batch, channels, height, width = h.shape
        dy = dy.to(h.dtype).contiguous()
        # dC sums over the channels: a program loops over a group of them. Without dC, one channel per program.
        group = max(1, min(CHANNEL_GROUP, channels)) if need_dc else 1
        n_groups = -(-channels // group)
        grid, block_h, block_w = _tiling(batch * n_groups, height, width)
        n_tiles = grid[1] * grid[2]

        def buffer(needed, shape, dtype=torch.float32):
            return torch.empty(shape, device=h.device, dtype=dtype) if needed else None

        dh = torch.empty_like(h) if need_dh else None
        du = torch.empty_like(u) if need_du else None
        dtaps_partial = buffer(need_dtaps, (batch, channels, n_tiles, N_TAPS))
        dc_partial = buffer(need_dc, (batch, n_groups, height, width))
        dd_partial = buffer(need_dd, (batch, channels, n_tiles))
        if h.numel() and any((need_dh, need_dtaps, need_dc, need_du, need_dd)):
            kernels = _kernels()
            with _device_guard(h):
                # Buffers that are not needed are never written: any tensor stands in for them.
                kernels.fused_observation_bwd_kernel[grid](
                    h,
                    taps,
                    C,
                    u,
                    D,
                    dy,
                    dh if need_dh else dy,
                    du if need_du else u,
                    dtaps_partial if need_dtaps else taps,
                    dc_partial if need_dc else taps,
                    dd_partial if need_dd else D,
                    channels,
                    height,
                    width,
                    group,
                    0,  # zero: see the kernel
                    NEED_DH=need_dh,
                    NEED_DTAPS=need_dtaps,
                    NEED_DC=need_dc,
                    NEED_DU=need_du,
                    NEED_DD=need_dd,
                    BLOCK_H=block_h,
                    BLOCK_W=block_w,
                    num_warps=NUM_WARPS,
                )
                if need_dh:
                    # Launched after the tile kernel on the same stream: it overwrites the border pixels.
                    _border_dgrad(kernels, taps, dy, C, dh)
        empty = not h.numel()
        dtaps = (torch.zeros_like(taps) if empty else dtaps_partial.sum((0, 2))) if need_dtaps else None
        dC = (torch.zeros_like(C) if empty else dc_partial.sum(1).to(C.dtype)) if need_dc else None
        dD = (torch.zeros_like(D) if empty else dd_partial.sum((0, 2))) if need_dd else None
        return dh, dtaps, dC, du, dD


def supports(h=None, taps=None, *rest):
    """Why the Triton fusion kernels cannot take these inputs: the CUDA kernels' dtype and plane limits, and a grid
    whose second or third axis (row and column tiles of a plane) would pass CUDA's 65535."""
    reasons = supports_state_fusion(h, taps)
    if isinstance(h, torch.Tensor) and h.dim() == 4 and h.numel():
        grid = _tiling(h.shape[0] * h.shape[1], h.shape[2], h.shape[3])[0]
        if max(grid[1:]) > 65535:
            reasons.append(f"a {h.shape[2]}x{h.shape[3]} plane ({grid[1]} x {grid[2]} tiles; the grid takes 65535)")
    return reasons


def _check(h: torch.Tensor, taps: torch.Tensor):
    if h.dim() != 4:
        raise ValueError(f"state_fusion: h must be (batch, channels, height, width); got {tuple(h.shape)}")
    if taps.shape != (h.shape[1], N_TAPS):
        raise ValueError(f"state_fusion: taps must be (channels={h.shape[1]}, {N_TAPS}); got {tuple(taps.shape)}")
    reasons = supports(h, taps)
    if reasons:
        raise ValueError(f"state_fusion: the kernels cannot take {'; '.join(reasons)}")


def state_fusion_triton(h: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """The 25-tap state fusion on Triton (backend implementation signature of the ``state_fusion`` op)."""
    _check(h, taps)
    return _StateFusionTriton.apply(h.contiguous(), taps.contiguous())


def supports_observation(h=None, taps=None, C=None, u=None, D=None, *rest):
    """Why the Triton fused observation kernels cannot take these inputs: the fusion's limits, a dtype of u and C
    they lack, or D in another dtype than float32."""
    reasons = supports(h, taps)
    if isinstance(u, torch.Tensor) and u.dtype not in KERNEL_DTYPES:
        reasons.append(f"{str(u.dtype).replace('torch.', '')} u and C (the kernels take float32, float16, bfloat16)")
    if isinstance(D, torch.Tensor) and D.dtype != torch.float32:
        reasons.append(f"{str(D.dtype).replace('torch.', '')} D (the kernels take float32 D)")
    return reasons


def _check_observation(h, taps, C, u, D):
    if h.dim() != 4:
        raise ValueError(f"fused observation: h must be (batch, channels, height, width); got {tuple(h.shape)}")
    batch, channels, height, width = h.shape
    if taps.shape != (channels, N_TAPS):
        raise ValueError(f"fused observation: taps must be (channels={channels}, {N_TAPS}); got {tuple(taps.shape)}")
    if C.shape != (batch, height, width):
        raise ValueError(
            f"fused observation: C must be (batch, height, width) = {(batch, height, width)}; got {tuple(C.shape)}"
        )
    if u.shape != h.shape:
        raise ValueError(f"fused observation: u must have h's shape {tuple(h.shape)}; got {tuple(u.shape)}")
    if u.dtype != C.dtype:
        raise ValueError(f"fused observation: u and C must share one dtype; got {u.dtype} and {C.dtype}")
    if D.shape != (channels,):
        raise ValueError(f"fused observation: D must be (channels={channels},); got {tuple(D.shape)}")
    reasons = supports_observation(h, taps, C, u, D)
    if reasons:
        raise ValueError(f"fused observation: the kernels cannot take {'; '.join(reasons)}")


def fused_observation_triton(h, taps, C, u, D) -> torch.Tensor:
    """y = fusion(h)·C + D·u on Triton (backend implementation signature of the ``fused_observation`` op)."""
    _check_observation(h, taps, C, u, D)
    return _FusedObservationTriton.apply(
        h.contiguous(), taps.contiguous(), C.contiguous(), u.contiguous(), D.contiguous()
    )


backend.register("state_fusion", "triton", state_fusion_triton, available, supports=supports)
backend.register("fused_observation", "triton", fused_observation_triton, available, supports=supports_observation)
