"""Triton backend of the one-pass state fusion op ``state_fusion``: ``fn(h, taps) -> out``.

out[b, c, y, x] = Σ_k taps[c, k] h[b, c, clamp(y + dy_k, 0, H - 1), clamp(x + dx_k, 0, W - 1)] over the 25 distinct
taps of the three dilated 3x3 kernels of the structure-aware state fusion (paper Eq. 4; the official
``classification/models/spatialmamba.py``, ``StateFusion``), with replicate borders. One pass serves training and
evaluation: the three dilated convolutions and the merged 11x11 kernel are the same function.

h: (B, C, H, W) contiguous float32, float16 or bfloat16; taps: (C, 25) float32. Returns h's dtype, computed in
float32; differentiable w.r.t. h (the adjoint folds the gradient of every clamped read onto the border pixel it read)
and taps. Like the other Triton backends it runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``
when forced (the tests). Importing this module never needs Triton.
"""

from __future__ import annotations

import torch

from . import backend
from ._cuda import supports_state_fusion
from .triton_scan import _device_guard, available

__all__ = ["N_TAPS", "state_fusion_triton", "supports"]

N_TAPS = 25
# Output tile of one program: up to 64 columns (the widest Spatial-Mamba maps at 224 are 56 wide), rows up to
# TILE_ELEMENTS in all; the border kernel takes BORDER_BLOCK border pixels per program. Not tuned on a GPU yet.
MAX_BLOCK_W = 64
TILE_ELEMENTS = 512
BORDER_BLOCK = 128
NUM_WARPS = 4


def _kernels():
    from . import _triton_state_fusion_kernels

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
                    n_border = border_pixels(height, width)
                    kernels.state_fusion_dgrad_border_kernel[(batch * channels, -(-n_border // BORDER_BLOCK))](
                        taps, dy, dh, channels, height, width, n_border, BLOCK=BORDER_BLOCK, num_warps=NUM_WARPS
                    )
        dtaps = None
        if need_dtaps:
            dtaps = partial.sum((0, 2)) if h.numel() else torch.zeros_like(taps)
        return dh, dtaps


def supports(h=None, taps=None, *rest):
    """Why the Triton fusion kernels cannot take these inputs (the same limits as the CUDA kernels)."""
    return supports_state_fusion(h, taps)


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


backend.register("state_fusion", "triton", state_fusion_triton, available, supports=supports)
