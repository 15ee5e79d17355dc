# Mask R-CNN + FPN, Spatial-Mamba-T, 1x schedule (12 epochs), 8 GPUs x 2 images, as the official file.
# Everything but the backbone comes from mmdet's Swin-T config: AdamW lr 1e-4, wd 0.05, decay_mult 0 for names
# containing 'norm'; 1000-iteration linear warm-up, steps at epochs 8 and 11; Resize (1333, 800) + flip; COCO
# bbox/segm metrics.
_base_ = "mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py"

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
        # ImageNet classification checkpoint (key "model"; add key="model_ema" for the EMA weights). A missing file
        # is an error; pretrained=None trains from a random backbone.
        pretrained="checkpoints/spatialmamba_tiny.pth",
    ),
    neck=dict(in_channels=[64, 128, 256, 512]),
)
