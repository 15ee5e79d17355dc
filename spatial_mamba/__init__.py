"""Spatial-Mamba: visual state space models with structure-aware state fusion (Xiao et al., ICLR 2025).

``import spatial_mamba`` registers ``spatial_mamba_tiny``, ``spatial_mamba_small`` and ``spatial_mamba_base`` with
timm, so ``timm.create_model("spatial_mamba_tiny")`` works.
"""

from . import ops
from .checkpoint import CheckpointError, load_checkpoint
from .models import (
    VARIANTS,
    SpatialMamba,
    SpatialMambaBackbone,
    spatial_mamba_base,
    spatial_mamba_small,
    spatial_mamba_tiny,
)

__version__ = "0.1.0"

# The official import name of the detection/segmentation backbone (classification/models/spatialmamba.py).
Backbone_SpatialMamba = SpatialMambaBackbone

__all__ = [
    "Backbone_SpatialMamba",
    "VARIANTS",
    "CheckpointError",
    "SpatialMamba",
    "SpatialMambaBackbone",
    "load_checkpoint",
    "ops",
    "spatial_mamba_base",
    "spatial_mamba_small",
    "spatial_mamba_tiny",
]
