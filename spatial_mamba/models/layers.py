"""Convolutional building blocks shared with MLLA: the stem, the downsampling layer and the MLP
(``classification/models/utils.py`` in the official repository)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvLayer", "Stem", "DownSampling", "Mlp"]


class ConvLayer(nn.Module):
    """Conv2d -> optional norm -> optional activation, with the official sub-module names (``conv``, ``norm``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = True,
        norm: bool = True,
        act: bool = True,
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(out_channels) if norm else None
        # In place: the convolution's (or the norm's) output is a temporary whose value neither backward needs, and on
        # the CPU a second tensor of the stem's and the downsampling's sizes costs more than the ReLU itself.
        self.act = nn.ReLU(inplace=True) if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class Stem(nn.Module):
    """Image (B, 3, H, W) -> channels-last tokens (B, ceil(H/4), ceil(W/4), C1)."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 96):
        super().__init__()
        half = embed_dim // 2
        self.conv1 = ConvLayer(in_chans, half, 3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Sequential(
            ConvLayer(half, half, 3, padding=1, bias=False),
            ConvLayer(half, half, 3, padding=1, bias=False, act=False),
        )
        self.conv3 = nn.Sequential(
            ConvLayer(half, embed_dim * 4, 3, stride=2, padding=1, bias=False),
            ConvLayer(embed_dim * 4, embed_dim, 1, bias=False, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last convolutions, so that the tokens come out as a contiguous (B, h, w, C) tensor: from a
        # (B, C, h, w) one they would be a permuted view, and every later op would keep that layout (on the CPU the
        # whole model then runs about 20% slower).
        x = self.conv1(x.contiguous(memory_format=torch.channels_last))
        x = self.conv2(x) + x  # residual pair, no activation after the add
        x = self.conv3(x)
        return x.permute(0, 2, 3, 1)


class DownSampling(nn.Module):
    """MLLA's PatchMerging with ratio 4: (B, h, w, C) -> (B, ceil(h/2), ceil(w/2), 2C)."""

    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        out_dim = 2 * dim
        hidden = int(out_dim * ratio)
        self.conv = nn.Sequential(
            ConvLayer(dim, hidden, 1, norm=False),
            ConvLayer(hidden, hidden, 3, stride=2, padding=1, groups=hidden, norm=False),
            ConvLayer(hidden, out_dim, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        # With autograd off the activation overwrites fc1's output, the block's widest tensor, instead of allocating one
        # more of its size (GELU's backward needs its input, so training keeps both).
        x = self.act(x) if torch.is_grad_enabled() else torch.ops.aten.gelu_(x)
        return self.drop(self.fc2(self.drop(x)))
