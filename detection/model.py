"""Registers the Spatial-Mamba backbone in mmdet's ``MODELS`` as ``MM_SpatialMamba`` (SPEC §2.4).

The tools run ``import model`` (as the official ones do); any other script using these configs must do the same,
from this directory or with it on ``PYTHONPATH``. Only mmdet is imported: mmseg need not be installed.
"""

from mmdet.registry import MODELS

from spatial_mamba.openmmlab import MMSpatialMamba

# force=True: re-importing this file under another module name registers the same class again.
MODELS.register_module(name="MM_SpatialMamba", module=MMSpatialMamba, force=True)

__all__ = ["MMSpatialMamba"]
