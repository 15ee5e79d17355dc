# Mask R-CNN + FPN, Spatial-Mamba-T, 3x schedule (36 epochs) with multi-scale + crop training, 8 GPUs x 2 images,
# as the official file. Everything but the backbone comes from mmdet's Swin-T 3x config: the 1x optimiser, steps at
# epochs 27 and 33, and the DETR-style RandomChoice of short side 480..800 resizing or resize + RandomCrop (384, 600)
# + resize.
_base_ = "mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py"

# Registers MM_SpatialMamba (in mmengine's root registry, which mmdet's and mmseg's fall back to): any tool that
# loads this config, ours or the installed package's own, can build the backbone.
custom_imports = dict(imports=["spatial_mamba.openmmlab"], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,  # drop the Swin arguments instead of passing them on (official bug; docs/official_bugs.md, #16)
        type="MM_SpatialMamba",
        dims=64,
        depths=(2, 4, 8, 4),
        d_state=1,
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        pretrained="checkpoints/spatialmamba_tiny.pth",
    ),
    neck=dict(in_channels=[64, 128, 256, 512]),
)
