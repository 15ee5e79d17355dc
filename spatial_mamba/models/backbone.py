"""Dense-prediction backbone: multi-scale NCHW feature maps with per-stage output norms (``Backbone_SpatialMamba``
in ``detection/model.py`` of the official repository).

The OpenMMLab wrappers in ``detection/`` and ``segmentation/`` only adapt this class to their registries.
"""

from __future__ import annotations

import logging
from typing import List, Sequence, Union

import torch
from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint
from .spatial_mamba import SpatialMambaTrunk

__all__ = ["SpatialMambaBackbone"]

logger = logging.getLogger("spatial_mamba")


class SpatialMambaBackbone(SpatialMambaTrunk):
    """Spatial-Mamba without its head, returning the stage outputs at strides 4/8/16/32 as NCHW maps.

    It shares the classifier's stem, stages and stage walk (and state-dict names) but never builds the final norm
    or head, so it has no method that could reach them.

    Args:
        out_indices: stages whose (pre-downsampling) output is returned, each normalised by ``outnorm{i}``.
        pretrained: path of a classification checkpoint to load (official layout or plain state dict). Missing
            files, other architectures or widths raise :class:`CheckpointError`; ``None`` keeps the random init.
        norm_layer: ``"ln"`` (official: LayerNorm over channels) or ``"bn"`` (BatchNorm2d, which the official
            code applied to channels-last tensors by mistake, docs/official_bugs.md, #20).
        key: checkpoint entry to load, ``"model"`` or ``"model_ema"``.
        **kwargs: :class:`SpatialMamba` architecture arguments (``dims``, ``depths``, ``d_state``,
            ``drop_path_rate``, ...); anything else (``num_classes`` included) is a ``TypeError``.
    """

    def __init__(
        self,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        pretrained: str | None = None,
        norm_layer: str = "ln",
        key: str = "model",
        **kwargs,
    ):
        super().__init__(**kwargs)
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
        self.apply(self._init_weights)
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
        # The walk stops after the last selected stage: the later stages would not contribute to any output.
        x, features = self.walk_stages(x, sorted(self.out_indices), stop_early=True)
        if not self.out_indices:
            return x
        outs = []
        for i, feat in zip(sorted(self.out_indices), features):
            norm = getattr(self, f"outnorm{i}")
            if self.norm_layer == "ln":
                outs.append(norm(feat).permute(0, 3, 1, 2).contiguous())
            else:
                outs.append(norm(feat.permute(0, 3, 1, 2).contiguous()))
        return outs
