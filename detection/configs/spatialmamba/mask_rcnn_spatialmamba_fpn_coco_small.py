# Mask R-CNN + FPN, Spatial-Mamba-S, 1x schedule: the tiny config with the small backbone, as the official file.
_base_ = "./mask_rcnn_spatialmamba_fpn_coco_tiny.py"

model = dict(
    backbone=dict(depths=(2, 4, 21, 5), drop_path_rate=0.3, pretrained="checkpoints/spatialmamba_small.pth"),
)
