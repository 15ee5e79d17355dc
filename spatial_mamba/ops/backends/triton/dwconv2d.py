"""Triton backend of the replicate-padded depthwise 2-D convolution of the state fusion (paper Eq. 4, SASF; the official
``kernels/dwconv2d``).

Like the Triton scan, it runs on CUDA tensors when the CUDA extension is not built, and on CPU tensors under
``TRITON_INTERPRET=1`` with ``SPATIAL_MAMBA_BACKEND=triton`` (the tests). The kernels live in
``dwconv2d_kernels.py``; importing this module never needs Triton.

The backward pass computes the input gradient on the replicate-padded domain (a zero-padded correlation of dy with the
flipped kernel, by the forward kernel) and folds the padding back onto the border with PyTorch's
``replication_pad2d_backward``; the weight gradient is reduced per tile in Triton and over batch and tiles in PyTorch.
"""

from __future__ import annotations

import torch

from ... import backend
from .selective_scan import _device_guard, available

__all__ = ["depthwise_conv2d_replicate_triton"]

# Output tile of one program: up to 64 columns (the widest Spatial-Mamba feature maps at 224 are 56 wide), and rows
# up to TILE_ELEMENTS in all. Not tuned on a GPU yet.
MAX_BLOCK_W = 64
TILE_ELEMENTS = 512
NUM_WARPS = 4


def _kernels():
    from . import dwconv2d_kernels as _triton_dwconv2d_kernels

    return _triton_dwconv2d_kernels


def _tiling(planes: int, height: int, width: int):
    """Returns (grid, BLOCK_H, BLOCK_W) for ``planes`` output planes of height x width."""
    import triton

    block_w = min(triton.next_power_of_2(width), MAX_BLOCK_W)
    block_h = min(triton.next_power_of_2(height), max(1, TILE_ELEMENTS // block_w))
    return (planes, triton.cdiv(height, block_h), triton.cdiv(width, block_w)), block_h, block_w


def _correlate(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, offset: int, dilation: int, replicate: bool):
    batch, channels, in_height, in_width = x.shape
    out_height, out_width = out.shape[-2:]
    grid, block_h, block_w = _tiling(batch * channels, out_height, out_width)
    with _device_guard(x):
        _kernels().dwconv2d_kernel[grid](
            x,
            weight,
            out,
            channels,
            in_height,
            in_width,
            out_height,
            out_width,
            OFFSET=offset,
            DILATION=dilation,
            K=weight.shape[-1],
            REPLICATE=replicate,
            BLOCK_H=block_h,
            BLOCK_W=block_w,
            num_warps=NUM_WARPS,
        )
    return out


class _DepthwiseConv2dReplicateTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, dilation):
        ctx.save_for_backward(x, weight)
        ctx.dilation = dilation
        return _correlate(x, weight, torch.empty_like(x), 0, dilation, replicate=True)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dilation = ctx.dilation
        dy = dy.contiguous()
        batch, channels, height, width = x.shape
        k = weight.shape[-1]
        pad = dilation * (k // 2)

        dx = None
        if ctx.needs_input_grad[0]:
            padded_shape = (batch, channels, height + 2 * pad, width + 2 * pad)
            dx_padded = torch.empty(padded_shape, device=x.device, dtype=torch.float32)
            _correlate(dy, weight.flip(-2, -1).contiguous(), dx_padded, pad, dilation, replicate=False)
            dx = torch.ops.aten.replication_pad2d_backward(dx_padded, dx_padded.new_empty(x.shape), [pad] * 4)
            dx = dx.to(x.dtype)

        dw = None
        if ctx.needs_input_grad[1]:
            grid, block_h, block_w = _tiling(batch * channels, height, width)
            dw_partial = torch.empty((batch, channels, grid[1] * grid[2], k * k), device=x.device, dtype=torch.float32)
            with _device_guard(x):
                _kernels().dwconv2d_weight_grad_kernel[grid](
                    x,
                    dy,
                    dw_partial,
                    height,
                    width,
                    DILATION=dilation,
                    K=k,
                    BLOCK_H=block_h,
                    BLOCK_W=block_w,
                    num_warps=NUM_WARPS,
                )
            dw = dw_partial.sum((0, 2)).view_as(weight).to(weight.dtype)
        return dx, dw, None


def depthwise_conv2d_replicate_triton(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """Depthwise cross-correlation with replicate padding dilation * (k // 2) (backend signature, see ``backend``).

    x: (B, C, H, W) contiguous; weight: (C, 1, k, k), odd k. Computes in fp32 and returns x's dtype; differentiable
    w.r.t. x and weight.
    """
    return _DepthwiseConv2dReplicateTriton.apply(x.contiguous(), weight.contiguous(), int(dilation))


def supports(x=None, weight=None, *rest):
    """Why the Triton convolution cannot take these inputs: float64 (it computes in float32)."""
    from ..cuda import _dtype_reasons

    return _dtype_reasons(x)


backend.register("dwconv2d", "triton", depthwise_conv2d_replicate_triton, available, supports=supports)
