# UPerNet, Spatial-Mamba-S, ADE20K: the tiny config with the small backbone, as the official file.
_base_ = "./upernet_spatialmamba_8xb2-160k_ade20k-512x512_tiny.py"

model = dict(
    backbone=dict(depths=(2, 4, 21, 5), drop_path_rate=0.3, pretrained="checkpoints/spatialmamba_small.pth"),
)
