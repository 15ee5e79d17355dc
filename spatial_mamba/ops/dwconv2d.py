"""Depthwise 2-D convolution with replicate padding (the SASF convolution, SPEC §1.6, §3b)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend

__all__ = ["depthwise_conv2d_replicate", "depthwise_conv2d_replicate_ref"]


def depthwise_conv2d_replicate_ref(x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """Pure-PyTorch depthwise conv (backend implementation signature, see ``backend``).

    F.conv2d keeps autocast's behaviour: under CPU bfloat16 or CUDA float16 autocast the convolution runs in low
    precision, as the official training path does (SPEC §1.5, dtypes under AMP).
    """
    pad = dilation * (weight.shape[-1] // 2)
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="replicate"), weight, dilation=dilation, groups=x.shape[1])


backend.register("dwconv2d", "reference", depthwise_conv2d_replicate_ref)


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
    return backend.select("dwconv2d", x)(x, weight, dilation)
