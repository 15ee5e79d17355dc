# UPerNet, Spatial-Mamba-T, ADE20K 512x512, 160k iterations, 8 GPUs x 2 images, as the official file.
# Everything but the backbone and the heads' widths comes from mmseg's Swin-T UPerNet config: AdamW lr 6e-5,
# wd 0.01, decay_mult 0 for names containing 'norm'; 1500-iteration linear warm-up then poly decay; RandomResize
# (2048, 512) x [0.5, 2] + RandomCrop 512 + flip + photometric distortion; single-scale test at (2048, 512).
# The official files were named 4xb4 but trained with 2 images per GPU on 8 GPUs (docs/official_bugs.md, #18); the
# name says what this file does.
_base_ = "mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py"

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
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, num_classes=150),
)

train_dataloader = dict(batch_size=2)
# --auto-scale-lr scales lr 6e-5 by (GPUs x batch per GPU) / 16.
auto_scale_lr = dict(enable=False, base_batch_size=16)

# Multi-scale + flip test of the official "ms" numbers (tools/test.py --tta): the (2048, 512) test scale times
# 0.75, 1.0 and 1.25, each with and without a horizontal flip; mmseg's default is six ratios of the image size.
tta_ratios = [0.75, 1.0, 1.25]
tta_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(
        type="TestTimeAug",
        transforms=[
            [dict(type="Resize", scale=(int(2048 * r), int(512 * r)), keep_ratio=True) for r in tta_ratios],
            [
                dict(type="RandomFlip", prob=0.0, direction="horizontal"),
                dict(type="RandomFlip", prob=1.0, direction="horizontal"),
            ],
            [dict(type="LoadAnnotations")],
            [dict(type="PackSegInputs")],
        ],
    ),
]
