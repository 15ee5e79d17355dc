"""The Spatial-Mamba backbone as an OpenMMLab model: ``type='MM_SpatialMamba'`` in mmdet and mmseg configs.

The configs of ``detection/`` and ``segmentation/`` load this module through
``custom_imports = dict(imports=["spatial_mamba.openmmlab"])``, so mmdet's and mmseg's own tools (``tools/train.py``,
``analysis_tools/get_flops.py``, ``benchmark.py``, ...) build the backbone from our configs as they are.

The class is registered once, in mmengine's root ``MODELS`` registry, which mmdet's and mmseg's registries fall back
to: importing it imports neither package, so each tree needs only its own (the official ``model.py`` registered into
both and needed both installed; docs/official_bugs.md, #17). ``import spatial_mamba`` does not import this module,
so the model package itself never imports a training framework.
"""

from __future__ import annotations

import inspect
import logging
from typing import Sequence

from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from .models import SpatialMamba, SpatialMambaBackbone

__all__ = ["MMSpatialMamba"]

# Arguments of SpatialMamba that make sense for a backbone; everything else is rejected by name.
_MODEL_ARGS = tuple(
    name
    for name, p in inspect.signature(SpatialMamba.__init__).parameters.items()
    if p.kind is p.POSITIONAL_OR_KEYWORD and name not in ("self", "img_size", "num_classes", "global_pool")
)


@MODELS.register_module(name="MM_SpatialMamba")
class MMSpatialMamba(SpatialMambaBackbone, BaseModule):
    """The dense Spatial-Mamba backbone for mmdet/mmseg configs (``type='MM_SpatialMamba'``).

    Args:
        out_indices, pretrained, norm_layer, key: as in :class:`~spatial_mamba.SpatialMambaBackbone`; ``pretrained``
            is a classification checkpoint (``key='model'`` or ``'model_ema'``) and a file that is missing or does
            not hold this backbone's weights is an error, never a random backbone (official bug;
            docs/official_bugs.md, #16).
        init_cfg: mmengine's initialisation config. ``dict(type='Pretrained', checkpoint=PATH)`` is the deferred
            form of ``pretrained=PATH`` (loaded by ``init_weights`` with the same checks); give one of the two.
        **model_kwargs: :class:`~spatial_mamba.SpatialMamba` arguments (``dims``, ``depths``, ``d_state``,
            ``drop_path_rate``, ...). Any other key is an error: the official class silently swallowed the Swin keys
            of the configs it inherited (docs/official_bugs.md, #16).

    Built once: the official class ran the backbone constructor twice through its base classes
    (docs/official_bugs.md, #17).
    """

    def __init__(
        self,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        pretrained: str | None = None,
        norm_layer: str = "ln",
        key: str = "model",
        init_cfg: dict | None = None,
        **model_kwargs,
    ):
        unknown = sorted(set(model_kwargs) - set(_MODEL_ARGS))
        if unknown:
            raise TypeError(
                f"MM_SpatialMamba got unexpected arguments {unknown}; expected out_indices, pretrained, norm_layer, "
                f"key, init_cfg or one of {list(_MODEL_ARGS)} (configs inheriting another backbone must replace it "
                "with _delete_=True)"
            )
        if pretrained is not None and init_cfg is not None:
            raise ValueError(
                f"MM_SpatialMamba got both pretrained={pretrained!r} and init_cfg={init_cfg!r}; give only one"
            )
        # The MRO runs SpatialMamba's super().__init__() into BaseModule.__init__ (init_cfg=None) and nn.Module, so
        # the network is built exactly once; init_cfg is attached afterwards.
        super().__init__(out_indices=out_indices, pretrained=pretrained, norm_layer=norm_layer, key=key, **model_kwargs)
        self.init_cfg = init_cfg
        self.pretrained, self.pretrained_key = pretrained, key

    def init_weights(self) -> None:
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get("type") == "Pretrained":
            # mmengine's own Pretrained loader reads 'state_dict' (else the whole file), not 'model', and only warns
            # about missing keys: with a classification checkpoint the backbone would stay random. Use ours instead.
            extra = sorted(set(cfg) - {"type", "checkpoint", "map_location"})
            if extra:
                raise ValueError(
                    f"MM_SpatialMamba init_cfg {dict(cfg)} has unsupported keys {extra}: it loads a classification "
                    "checkpoint; use load_from for a detector or segmentor checkpoint"
                )
            self.load_pretrained(cfg["checkpoint"], self.pretrained_key)
            self._is_init = True
            return
        if cfg is None and self.pretrained is None:
            print_log(
                "MM_SpatialMamba: neither pretrained nor init_cfg is set, the backbone is randomly initialised "
                "(unless load_from or --resume restores the whole model)",
                logger="current",
                level=logging.WARNING,
            )
        super().init_weights()
