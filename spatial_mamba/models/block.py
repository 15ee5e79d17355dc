"""The MLLA-style macro block with the structure-aware SSM as its token mixer, and the stage that stacks them
(``SpatialMambaBlock`` and ``SpatialMambaLayer`` in ``classification/models/spatialmamba.py``)."""

from __future__ import annotations

from typing import Sequence, Union

import torch
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import DownSampling, Mlp
from .ssm import StructureAwareSSM

__all__ = ["SpatialMambaBlock", "SpatialMambaLayer"]


def residual(branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x + branch``, written into ``branch``: a temporary of the block whose value no backward needs (a
    convolution's, a linear layer's or DropPath's output), so the sum costs no new tensor (on the CPU, allocating one
    costs more than the addition). Out of place where the dtypes differ: under autocast the branch is half precision,
    and the sum keeps x's. A forward hook that keeps a branch module's output must clone it (docs/architecture.md)."""
    if branch.dtype != x.dtype:
        return x + branch
    return branch.add_(x)


# torch.fx records calls to ``residual`` instead of tracing its dtype test (timm's FX feature extraction).
torch.fx.wrap("residual")


class SpatialMambaBlock(nn.Module):
    """x + cpe1(x); x + DropPath(SSM(LN(x))); x + cpe2(x); x + DropPath(MLP(LN(x))), on (B, h, w, C) tokens."""

    def __init__(
        self,
        hidden_dim: int,
        drop_path: float = 0.0,
        d_state: int = 1,
        dt_init: str = "random",
        mlp_ratio: float = 4.0,
        attn_drop_rate: float = 0.0,
        drop: float = 0.0,
    ):
        super().__init__()
        self.cpe1 = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.ln_1 = nn.LayerNorm(
            hidden_dim
        )  # eps 1e-5: the layer overrides the block's 1e-6 default (docs/official_bugs.md, #9)
        self.self_attention = StructureAwareSSM(hidden_dim, d_state=d_state, dt_init=dt_init, dropout=attn_drop_rate)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.cpe2 = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.ln_2 = nn.LayerNorm(hidden_dim)
        self.mlp = Mlp(hidden_dim, int(hidden_dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = residual(self.cpe1(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), x)
        x = residual(self.drop_path(self.self_attention(self.ln_1(x))), x)
        x = residual(self.cpe2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), x)
        x = residual(self.drop_path(self.mlp(self.ln_2(x))), x)
        return x


class SpatialMambaLayer(nn.Module):
    """One stage: ``depth`` blocks, then an optional 2x downsampling (stages 0-2)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        drop_path: Union[float, Sequence[float]] = 0.0,
        downsample: bool = True,
        d_state: int = 1,
        dt_init: str = "random",
        mlp_ratio: float = 4.0,
        attn_drop_rate: float = 0.0,
        drop: float = 0.0,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SpatialMambaBlock(dim, rates[i], d_state, dt_init, mlp_ratio, attn_drop_rate, drop) for i in range(depth)
        )
        self.downsample: DownSampling | None = DownSampling(dim) if downsample else None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return self.downsample(x) if self.downsample is not None else x
