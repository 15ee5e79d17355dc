"""The classifier, built from the config. The architecture itself lives only in ``spatial_mamba``."""

from __future__ import annotations

import spatial_mamba

try:
    from .config import UsageError
except ImportError:  # imported as the top-level ``models`` from classification/, as official user code does
    from config import UsageError

__all__ = ["build_model", "Backbone_SpatialMamba", "SpatialMamba"]

# The official names, for user code written against the official ``classification/models`` package.
Backbone_SpatialMamba = spatial_mamba.SpatialMambaBackbone
SpatialMamba = spatial_mamba.SpatialMamba


def build_model(config) -> spatial_mamba.SpatialMamba:
    """``spatial_mamba.SpatialMamba`` with the arguments the official ``build_model`` passes
    (``classification/models/__init__.py``), and TRAIN.USE_CHECKPOINT passed on, which the official code never did
    (docs/official_bugs.md, #11)."""
    if config.MODEL.TYPE != "spatial_mamba":
        raise UsageError(f"MODEL.TYPE must be 'spatial_mamba', got {config.MODEL.TYPE!r}")
    sm = config.MODEL.SPATIALMAMBA
    try:
        model = spatial_mamba.SpatialMamba(
            depths=list(sm.DEPTHS),
            dims=sm.EMBED_DIM,
            d_state=sm.D_STATE,
            dt_init=sm.DT_INIT,
            mlp_ratio=sm.MLP_RATIO,
            drop_rate=config.MODEL.DROP_RATE,
            drop_path_rate=config.MODEL.DROP_PATH_RATE,
            num_classes=config.MODEL.NUM_CLASSES,
            in_chans=sm.IN_CHANS,
            patch_size=sm.PATCH_SIZE,
        )
    except ValueError as err:
        raise UsageError(f"MODEL.SPATIALMAMBA: {err}") from err
    model.set_grad_checkpointing(config.TRAIN.USE_CHECKPOINT)
    return model
