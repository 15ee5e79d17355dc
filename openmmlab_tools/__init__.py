"""Command lines behind ``detection/tools`` and ``segmentation/tools``: training, testing and FLOP counting with
mmengine's runner, for mmdet and mmseg configs that use the Spatial-Mamba backbone.

Kept out of the ``spatial_mamba`` package, which holds the model and knows no training framework; the backbone itself
reaches mmdet and mmseg through the configs' ``custom_imports`` (``spatial_mamba.openmmlab``).
"""
