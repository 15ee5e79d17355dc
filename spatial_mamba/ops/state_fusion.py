"""Structure-aware state fusion (SASF, SPEC §1.6): three dilated depthwise 3x3 convolutions of the scan state.

h_t = Σ_{d ∈ {1, 3, 5}} α_d Σ_{i, j ∈ {-1, 0, 1}} k^d_ij x_{t + d i w + d j}, with replicate borders.

The training path runs the three dilated convolutions; the merged (re-parameterised) path runs one 11x11 depthwise
convolution whose kernel places the three dilated kernels on one grid. With replicate padding both are exactly the
same function, borders included (SPEC §7.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dwconv2d import depthwise_conv2d_replicate

__all__ = ["DILATIONS", "merge_state_fusion_kernels", "state_fusion"]

DILATIONS = (1, 3, 5)


def _check_kernels(kernel_3, kernel_3_1, kernel_3_2, alpha) -> int:
    channels = kernel_3.shape[0]
    for name, kernel in (("kernel_3", kernel_3), ("kernel_3_1", kernel_3_1), ("kernel_3_2", kernel_3_2)):
        if kernel.shape != (channels, 1, 3, 3):
            raise ValueError(f"state fusion: {name} must be (channels={channels}, 1, 3, 3); got {tuple(kernel.shape)}")
    if alpha.shape != (len(DILATIONS),):
        raise ValueError(f"state fusion: alpha must be ({len(DILATIONS)},); got {tuple(alpha.shape)}")
    return channels


def _dilate(kernel: torch.Tensor, dilation: int) -> torch.Tensor:
    """(D, 1, 3, 3) -> (D, 1, 2 d + 1, 2 d + 1) with the taps d apart and zeros between them, out of place."""
    spaced = F.pad(kernel[:, :, :, None, :, None], (0, dilation - 1, 0, 0, 0, dilation - 1))
    size = 3 * dilation
    return spaced.reshape(*kernel.shape[:2], size, size)[..., : size - dilation + 1, : size - dilation + 1]


def merge_state_fusion_kernels(kernel_3, kernel_3_1, kernel_3_2, alpha) -> torch.Tensor:
    """The (D, 1, 11, 11) kernel equal to the three branches (SPEC §1.6, eval path).

    α0·kernel_3 fills rows/cols 4..6, α1·kernel_3_1 the taps {2, 5, 8}², α2·kernel_3_2 the taps {0, 5, 10}², and the
    centre sums the three centre taps. Built out of place, so gradients reach the kernels and alpha. The result is
    float32 (float64 when the kernels are float64).
    """
    _check_kernels(kernel_3, kernel_3_1, kernel_3_2, alpha)
    dtype = torch.promote_types(torch.promote_types(kernel_3.dtype, alpha.dtype), torch.float32)
    placed = [
        F.pad(_dilate(alpha[index].to(dtype) * kernel.to(dtype), dilation), 4 * (DILATIONS[-1] - dilation,))
        for index, (kernel, dilation) in enumerate(zip((kernel_3, kernel_3_1, kernel_3_2), DILATIONS))
    ]
    return placed[0] + placed[1] + placed[2]


def state_fusion(h, kernel_3, kernel_3_1, kernel_3_2, alpha, merged: bool) -> torch.Tensor:
    """Fuses the scan states h (B, D, H, W) with their dilated neighbourhoods; returns (B, D, H, W).

    merged=False is the official training path α0·dw(h, k3, 1) + α1·dw(h, k3_1, 3) + α2·dw(h, k3_2, 5), with each
    α folded into its kernel (the same function, with three fewer passes over h). merged=True runs one 11x11
    convolution with the kernel merged from the current weights on every call: the official code cached it on the
    first eval call and never rebuilt it, so later weight updates were ignored (SPEC §7.1).
    """
    channels = _check_kernels(kernel_3, kernel_3_1, kernel_3_2, alpha)
    if h.dim() != 4 or h.shape[1] != channels:
        raise ValueError(f"state fusion: h must be (batch, channels={channels}, height, width); got {tuple(h.shape)}")
    if merged:
        weight = merge_state_fusion_kernels(kernel_3, kernel_3_1, kernel_3_2, alpha)
        return depthwise_conv2d_replicate(h, weight.to(h.dtype), 1)
    fused = None
    for index, (kernel, dilation) in enumerate(zip((kernel_3, kernel_3_1, kernel_3_2), DILATIONS)):
        branch = depthwise_conv2d_replicate(h, (alpha[index] * kernel).to(h.dtype), dilation)
        fused = branch if fused is None else fused.add_(branch)
    return fused
