"""ImageNet-1K classification with Spatial-Mamba: the official training recipe (official ``classification/main.py``)
on top of ``spatial_mamba``.

Run it the official way, from this folder::

    python -m torch.distributed.launch --nproc_per_node=8 main.py \
        --cfg configs/spatialmamba/spatialmamba_tiny.yaml --batch-size 128 --data-path /imagenet --output /tmp
"""
