"""Dense-prediction backbone: multi-scale NCHW feature maps with per-stage output norms (SPEC §2.4).

The OpenMMLab wrappers in ``detection/`` and ``segmentation/`` only adapt this class to their registries.
"""

from __future__ import annotations

import logging
from typing import List, Sequence, Union

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint
from .spatial_mamba import SpatialMamba, check_image_batch

__all__ = ["SpatialMambaBackbone"]

logger = logging.getLogger("spatial_mamba")


class SpatialMambaBackbone(SpatialMamba):
    """Spatial-Mamba without its head, returning the stage outputs at strides 4/8/16/32 as NCHW maps.

    Args:
        out_indices: stages whose (pre-downsampling) output is returned, each normalised by ``outnorm{i}``.
        pretrained: path of a classification checkpoint to load (official layout or plain state dict). Missing
            files, other architectures or widths raise :class:`CheckpointError`; ``None`` keeps the random init.
        norm_layer: ``"ln"`` (official: LayerNorm over channels) or ``"bn"`` (BatchNorm2d, which the official
            code applied to channels-last tensors by mistake, SPEC §7.20).
        key: checkpoint entry to load, ``"model"`` or ``"model_ema"``.
        **kwargs: :class:`SpatialMamba` arguments (``dims``, ``depths``, ``d_state``, ``drop_path_rate``, ...).
    """

    def __init__(
        self,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        pretrained: str | None = None,
        norm_layer: str = "ln",
        key: str = "model",
        **kwargs,
    ):
        kwargs.pop("num_classes", None)
        super().__init__(num_classes=0, **kwargs)
        num_stages = len(self.layers)
        self.out_indices = tuple(int(i) for i in out_indices)
        if any(not 0 <= i < num_stages for i in self.out_indices):
            raise ValueError(f"out_indices must be in [0, {num_stages}), got {list(out_indices)}")
        if norm_layer not in ("ln", "bn"):
            raise ValueError(f"norm_layer must be 'ln' or 'bn', got {norm_layer!r}")
        self.norm_layer = norm_layer
        for i in self.out_indices:
            norm = nn.LayerNorm(self.dims[i]) if norm_layer == "ln" else nn.BatchNorm2d(self.dims[i])
            self.add_module(f"outnorm{i}", norm)
        del self.head, self.norm, self.avgpool
        if pretrained is not None:
            self.load_pretrained(pretrained, key)

    def load_pretrained(self, path: str, key: str = "model") -> None:
        """Loads classifier weights; only the output norms may be missing and only the classifier head and final
        norm may be unexpected — anything else means the checkpoint does not belong to this backbone."""
        if not path:
            raise CheckpointError("pretrained is an empty path; give a checkpoint file, or None for a random init")
        result = load_checkpoint(self, path, key=key, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("outnorm")]
        unexpected = [k for k in result.unexpected_keys if not k.startswith(("norm.", "head."))]
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {path!r} (key {key!r}) does not hold the weights of this backbone: "
                f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
            )
        logger.info("backbone weights loaded from %s (key %r)", path, key)

    def forward(self, x: torch.Tensor) -> Union[List[torch.Tensor], torch.Tensor]:
        check_image_batch(x, self.in_chans)
        x = self.pos_drop(self.patch_embed(x))
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer.forward_blocks(x)
            if i in self.out_indices:
                norm = getattr(self, f"outnorm{i}")
                if self.norm_layer == "ln":
                    outs.append(norm(x).permute(0, 3, 1, 2).contiguous())
                else:
                    outs.append(norm(x.permute(0, 3, 1, 2).contiguous()))
            if layer.downsample is not None:
                x = layer.downsample(x)
        if not self.out_indices:
            return x
        return outs

    def forward_features(self, x: torch.Tensor):
        return self.forward(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        raise NotImplementedError("SpatialMambaBackbone has no classification head; use SpatialMamba")
