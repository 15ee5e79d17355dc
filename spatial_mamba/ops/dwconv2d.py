"""Depthwise 2-D convolution with replicate padding (the convolution of the structure-aware state fusion)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import compat
from . import backend

__all__ = ["depthwise_conv2d_replicate", "depthwise_conv2d_replicate_ref"]


def _replicate_pad_adjoint(grad_padded: torch.Tensor, pad: int, height: int, width: int) -> torch.Tensor:
    """The gradient w.r.t. x of ``F.pad(x, (pad,) * 4, mode="replicate")`` (x of height x width) from the gradient
    w.r.t. the padded tensor, in slices and sums: the ``pad`` rows above x's first row (and below its last) fold onto
    that row, then the columns likewise; a side of 1 folds all of its rows (columns) onto one.

    The same function as ``aten.replication_pad2d_backward``, in plain ops that torch.compile's inductor fuses into one
    kernel; inductor rejects that aten op's output strides (the strides its fake kernel gives differ from the real
    kernel's). Eager calls keep the aten kernel, which is the faster of the two on the CPU
    (``benchmarks/dwconv_cpu.py``).
    """
    for dim, size in ((-2, height), (-1, width)):
        if size == 1:
            grad_padded = grad_padded.sum(dim, keepdim=True)
            continue
        first = grad_padded.narrow(dim, 0, pad + 1).sum(dim, keepdim=True)
        last = grad_padded.narrow(dim, pad + size - 1, pad + 1).sum(dim, keepdim=True)
        grad_padded = torch.cat([first, grad_padded.narrow(dim, pad + 1, size - 2), last], dim)
    return grad_padded


class _DepthwiseConvReplicateCPU(torch.autograd.Function):
    """The reference convolution with a backward written for the CPU.

    oneDNN's depthwise backward is slow on the CPU, and pathologically so for dilated kernels (about 10x the forward
    for the input gradient and up to 15x for the weight gradient at Spatial-Mamba-T's first stage). Both gradients
    are forward convolutions instead: the input gradient is the flipped kernel run over the zero-padded output
    gradient, folded back through the replicate padding; the weight gradient correlates each padded input plane with
    its output-gradient plane (one grouped conv with stride = dilation), summed over the batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
        pad = dilation * (weight.shape[-1] // 2)
        ctx.save_for_backward(x, weight)
        ctx.dilation = dilation
        return F.conv2d(F.pad(x, (pad,) * 4, mode="replicate"), weight, dilation=dilation, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        dilation, (batch, channels, height, width), k = ctx.dilation, x.shape, weight.shape[-1]
        pad = dilation * (k // 2)
        grad_out = grad_out.to(x.dtype).contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_padded = F.conv2d(
                F.pad(grad_out, (2 * pad,) * 4), weight.flip(-1, -2), dilation=dilation, groups=channels
            )
            if compat.is_compiling():
                grad_x = _replicate_pad_adjoint(grad_padded, pad, height, width)
            else:
                grad_x = torch.ops.aten.replication_pad2d_backward(grad_padded, x, [pad] * 4)
        if ctx.needs_input_grad[1] and batch == 0:
            grad_w = torch.zeros_like(weight)
        elif ctx.needs_input_grad[1]:
            padded = F.pad(x, (pad,) * 4, mode="replicate")
            grad_w = F.conv2d(
                padded.reshape(1, batch * channels, height + 2 * pad, width + 2 * pad),
                grad_out.reshape(batch * channels, 1, height, width),
                stride=dilation,
                groups=batch * channels,
            )
            grad_w = grad_w.reshape(batch, channels, k, k).sum(0).unsqueeze(1).to(weight.dtype)
        return grad_x, grad_w, None


def depthwise_conv2d_replicate_ref(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """Pure-PyTorch depthwise conv (backend implementation signature, see ``backend``).

    Keeps autocast's behaviour: under CPU bfloat16 or CUDA float16 autocast the convolution runs in low precision,
    as the official training path does.
    """
    compat.require_cpu_float16(x)
    if x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        dtype = compat.autocast_dtype("cpu")
        if dtype is not None:
            x, weight = x.to(dtype), weight.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return _DepthwiseConvReplicateCPU.apply(x, weight, dilation)
    pad = dilation * (weight.shape[-1] // 2)
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="replicate"), weight, dilation=dilation, groups=x.shape[1])


backend.register("dwconv2d", "reference", depthwise_conv2d_replicate_ref)


@compat.eager_op
def depthwise_conv2d_replicate(x: torch.Tensor, weight: torch.Tensor, dilation: int = 1) -> torch.Tensor:
    """Depthwise cross-correlation, stride 1, replicate padding of dilation * (k // 2): output has x's shape.

    Args:
        x: (B, C, H, W), any H, W >= 1.
        weight: (C, 1, k, k) with odd k.
        dilation: int >= 1.
    """
    if x.dim() != 4:
        raise ValueError(
            f"depthwise_conv2d_replicate: x must be (batch, channels, height, width); got {tuple(x.shape)}"
        )
    channels = x.shape[1]
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(
            f"depthwise_conv2d_replicate: weight must be (channels, 1, k, k) with odd k; got {tuple(weight.shape)}"
        )
    if weight.shape[0] != channels:
        raise ValueError(
            f"depthwise_conv2d_replicate: weight has {weight.shape[0]} channels, x has {channels}; they must match"
        )
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"depthwise_conv2d_replicate: dilation must be an int >= 1; got {dilation!r}")
    if min(x.shape[2:]) < 1:
        raise ValueError(f"depthwise_conv2d_replicate: x must have height and width >= 1; got {tuple(x.shape)}")
    x = x.contiguous()
    return backend.select("dwconv2d", x, weight)(x, weight, dilation)
