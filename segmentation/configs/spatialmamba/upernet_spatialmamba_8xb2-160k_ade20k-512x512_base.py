# UPerNet, Spatial-Mamba-B, ADE20K: the tiny config with the base backbone, as the official file.
_base_ = "./upernet_spatialmamba_8xb2-160k_ade20k-512x512_tiny.py"

model = dict(
    backbone=dict(dims=96, depths=(2, 4, 21, 5), drop_path_rate=0.5, pretrained="checkpoints/spatialmamba_base.pth"),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)
