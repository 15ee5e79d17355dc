"""Small generated scenes for the OpenMMLab end-to-end tests, written in the COCO and ADE20K layouts.

Each scene is a smooth random background with a few of scikit-learn's 8x8 handwritten digits (real data that needs
no download) upscaled, coloured and pasted on it; the pasted pixels give exact instance masks and class maps. Also here:
the narrow Mask R-CNN config of the detection tests, and a runner for mmdet's own tools.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def make_scene(
    rng: np.random.Generator,
    size: int = 96,
    max_objects: int = 3,
    digits: Sequence[int] | None = None,
    sides: Tuple[float, float] = (0.25, 0.5),
) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """Returns an RGB image (size, size, 3) uint8 and its visible instances as (digit, boolean mask) pairs: 1 to
    ``max_objects`` glyphs of the given ``digits`` (all ten by default), each a square of side in ``sides`` (fractions
    of ``size``, upper bound excluded)."""
    dataset = load_digits()
    pool = np.arange(len(dataset.target)) if digits is None else np.flatnonzero(np.isin(dataset.target, digits))
    if len(pool) == 0:
        raise ValueError(f"digits={digits!r}: expected some of 0-9")
    yy, xx = np.mgrid[0:size, 0:size] / size
    low, high = rng.uniform(0, 110, 3), rng.uniform(0, 110, 3)
    image = low + (high - low) * (0.5 * (yy + xx))[..., None] + rng.normal(0, 4, (size, size, 3))
    instances: List[Tuple[int, np.ndarray]] = []
    for _ in range(rng.integers(1, max_objects + 1)):
        index = pool[rng.integers(len(pool))]
        side = int(rng.integers(int(size * sides[0]), int(size * sides[1])))
        glyph = Image.fromarray((dataset.images[index] * 255 / 16).astype(np.uint8)).resize(
            (side, side), Image.BILINEAR
        )
        mask = np.zeros((size, size), bool)
        top, left = rng.integers(0, size - side, 2)
        mask[top : top + side, left : left + side] = np.asarray(glyph) > 96
        image[mask] = rng.uniform(160, 255, 3)
        # Later digits occlude earlier ones: keep only the visible part of each mask.
        instances = [(label, m & ~mask) for label, m in instances]
        instances.append((int(dataset.target[index]), mask))
    instances = [(label, m) for label, m in instances if m.sum() >= 16]
    return np.clip(image, 0, 255).astype(np.uint8), instances


def write_coco(root: Path, splits: Sequence[Tuple[str, int]], seed: int = 0, size: int = 96) -> None:
    """Writes ``root/{split}2017/*.jpg`` and ``root/annotations/instances_{split}2017.json`` (RLE masks)."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(DIGIT_CLASSES)]
    for split, count in splits:
        (root / f"{split}2017").mkdir(exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            image, instances = make_scene(rng, size)
            file_name = f"{image_id:012d}.jpg"
            Image.fromarray(image).save(root / f"{split}2017" / file_name, quality=95)
            images.append(dict(id=image_id, file_name=file_name, height=size, width=size))
            for label, mask in instances:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                x, y, w, h = mask_utils.toBbox(rle).tolist()
                annotations.append(
                    dict(
                        id=len(annotations) + 1,
                        image_id=image_id,
                        category_id=label + 1,
                        bbox=[x, y, w, h],
                        area=float(mask.sum()),
                        iscrowd=0,
                        segmentation=dict(size=rle["size"], counts=rle["counts"].decode()),
                    )
                )
        (root / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps(dict(images=images, annotations=annotations, categories=categories))
        )


def write_ade20k(root: Path, splits: Sequence[Tuple[str, int]], seed: int = 0, size: int = 96, **scene) -> None:
    """Writes ``root/images/{split}/*.jpg`` and ``root/annotations/{split}/*.png``; ``scene`` goes to
    :func:`make_scene` (``max_objects``, ``digits``, ``sides``).

    ADE20K label maps keep 0 for "other" (dropped by ``reduce_zero_label``); here the background is label 1 and digit
    d is label d + 2, i.e. classes 0 and d + 1 after the reduction.
    """
    rng = np.random.default_rng(seed)
    for split, count in splits:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, instances = make_scene(rng, size, **scene)
            labels = np.ones((size, size), np.uint8)
            for digit, mask in instances:
                labels[mask] = digit + 2
            name = f"ADE_{split}_{index:08d}"
            Image.fromarray(image).save(root / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(labels).save(root / "annotations" / split / f"{name}.png")


ROOT = Path(__file__).resolve().parents[2]

# The official tiny config with a narrow backbone, heads sized for a CPU, 96-pixel scenes resized to at most 128 pixels,
# and a constant learning rate; the model structure, optimiser type and COCO metrics stay the config's own.
MASK_RCNN_CONFIG = """
_base_ = "{base}"
data_root = "{data}/"
metainfo = dict(classes={classes})
model = dict(
    backbone=dict(dims=16, depths=(1, 1, 1, 1), drop_path_rate=0.0, pretrained={pretrained!r}),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=10),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=32, num_classes=10),
    ),
    train_cfg=dict(rpn_proposal=dict(nms_pre=200, max_per_img=100), rcnn=dict(sampler=dict(num=64))),
    # A barely trained detector scores below the default 0.05 and COCO evaluation of no boxes reports nothing.
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=100), rcnn=dict(score_thr=0.0)),
)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="Resize", scale=(128, 96), keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(128, 96), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline,
                 ann_file="annotations/instances_train2017.json", data_prefix=dict(img="train2017/")),
)
val_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline,
                 ann_file="annotations/instances_val2017.json", data_prefix=dict(img="val2017/")),
)
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + "annotations/instances_val2017.json")
test_evaluator = val_evaluator
# A constant, higher learning rate, so that a few dozen iterations learn something measurable.
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = []
randomness = dict(seed=0)
train_cfg = dict(max_epochs=6, val_interval=100)
default_hooks = dict(logger=dict(interval=4), checkpoint=dict(interval=6))
"""


def write_mask_rcnn_config(path: Path, data: Path, pretrained: Path | None) -> Path:
    """Writes :data:`MASK_RCNN_CONFIG` for the scenes under ``data`` (``write_coco``); returns ``path``."""
    path.write_text(
        MASK_RCNN_CONFIG.format(
            base=ROOT / "detection/configs/spatialmamba/mask_rcnn_spatialmamba_fpn_coco_tiny.py",
            data=data,
            classes=DIGIT_CLASSES,
            pretrained=None if pretrained is None else str(pretrained),
        )
    )
    return path


def run_mmdet_tool(tool: str, *args, cwd: Path) -> str:
    """Runs ``mmdet/.mim/tools/<tool>`` unchanged, from outside the repository, with mmseg made unimportable: only
    the config's ``custom_imports`` can register the backbone."""
    import subprocess
    import sys

    import mmdet

    path = Path(mmdet.__file__).parent / ".mim" / "tools" / tool
    code = (
        "import runpy, sys; sys.modules['mmseg'] = None; "
        f"sys.argv = {[str(path), *map(str, args)]!r}; runpy.run_path({str(path)!r}, run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{tool} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr
