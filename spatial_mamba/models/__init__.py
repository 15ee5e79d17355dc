from .backbone import SpatialMambaBackbone
from .block import SpatialMambaBlock, SpatialMambaLayer
from .spatial_mamba import (
    VARIANTS,
    SpatialMamba,
    SpatialMambaTrunk,
    spatial_mamba_base,
    spatial_mamba_small,
    spatial_mamba_tiny,
)
from .ssm import StateFusion, StructureAwareSSM

__all__ = [
    "VARIANTS",
    "SpatialMamba",
    "SpatialMambaBackbone",
    "SpatialMambaBlock",
    "SpatialMambaLayer",
    "SpatialMambaTrunk",
    "StateFusion",
    "StructureAwareSSM",
    "spatial_mamba_base",
    "spatial_mamba_small",
    "spatial_mamba_tiny",
]
