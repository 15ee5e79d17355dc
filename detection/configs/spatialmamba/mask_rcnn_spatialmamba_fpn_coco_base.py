# Mask R-CNN + FPN, Spatial-Mamba-B, 1x schedule: the tiny config with the base backbone, as the official file.
_base_ = "./mask_rcnn_spatialmamba_fpn_coco_tiny.py"

model = dict(
    backbone=dict(dims=96, depths=(2, 4, 21, 5), drop_path_rate=0.5, pretrained="checkpoints/spatialmamba_base.pth"),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
