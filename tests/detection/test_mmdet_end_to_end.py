"""Mask R-CNN with a narrow Spatial-Mamba backbone, end to end through the user-facing scripts on the CPU:
``detection/tools/train.py`` trains a few iterations from a classification checkpoint, resumes, and
``detection/tools/test.py`` reports COCO bbox and segm mAP (SPEC §5.1). Data: generated digit scenes (scenes.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet", reason="needs the OpenMMLab stack: bash tools/setup_env.sh --mm")
pytestmark = [pytest.mark.mm, pytest.mark.slow]

sys.path.insert(0, str(Path(__file__).parent))
from scenes import DIGIT_CLASSES, write_coco  # noqa: E402

from spatial_mamba import SpatialMamba  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TREE = ROOT / "detection"

# The official tiny config with a narrow backbone, heads sized for a CPU, 96-pixel scenes resized to at most 128 pixels,
# and a constant learning rate; the model structure, optimiser type and COCO metrics stay the config's own.
TEST_CONFIG = """
_base_ = "{base}"
data_root = "{data}/"
metainfo = dict(classes={classes})
model = dict(
    backbone=dict(dims=16, depths=(1, 1, 1, 1), drop_path_rate=0.0, pretrained="{pretrained}"),
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


def _run(args, cwd=TREE):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


def _scalars(work_dir: Path):
    (log,) = work_dir.glob("*/vis_data/scalars.json")
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mmdet")
    write_coco(tmp / "coco", [("train", 8), ("val", 4)])
    pretrained = tmp / "latest_ckpt.pth"
    torch.manual_seed(0)
    classifier = SpatialMamba(dims=16, depths=(1, 1, 1, 1), num_classes=10)
    torch.save({"model": classifier.state_dict(), "epoch": 299}, pretrained)
    config = tmp / "mask_rcnn_narrow.py"
    config.write_text(
        TEST_CONFIG.format(
            base=TREE / "configs/spatialmamba/mask_rcnn_spatialmamba_fpn_coco_tiny.py",
            data=tmp / "coco",
            classes=DIGIT_CLASSES,
            pretrained=pretrained,
        )
    )
    return tmp, config


def test_train_resume_and_test_report_coco_bbox_and_segm_map(setup):
    tmp, config = setup
    work_dir = tmp / "work"
    out = _run(["tools/train.py", config, "--work-dir", work_dir])
    assert "backbone weights loaded from" in out
    losses = [s["loss"] for s in _scalars(work_dir) if "loss" in s]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))  # 6 epochs of 4 batches, logged every 4

    # --resume reads the mmengine checkpoint back (torch weights_only loading) and continues at epoch 7.
    resume = ["--resume", "--cfg-options", "train_cfg.max_epochs=18"]
    out = _run(["tools/train.py", config, "--work-dir", work_dir, *resume])
    assert "resumed epoch: 6, iter: 24" in out, out[-2000:]
    checkpoint = work_dir / "epoch_18.pth"
    assert checkpoint.is_file()

    out = _run(["tools/test.py", config, checkpoint, "--work-dir", tmp / "test"])
    assert "Epoch(test) [4/4]" in out
    metrics = {k: float(v) for k, v in re.findall(r"coco/(\w+_mAP(?:_50)?): (-?[\d.]+)", out)}
    assert {"bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50"} <= set(metrics), out[-2000:]
    assert all(0.0 <= v <= 1.0 for v in metrics.values()), metrics
    # 72 iterations find digits (box AP50 0.14 to 0.28 in our runs); an untrained detector scores about 0.01.
    assert metrics["bbox_mAP_50"] > 0.05, metrics


def test_test_script_rejects_a_missing_checkpoint_naming_it(setup):
    tmp, config = setup
    missing = tmp / "no_such_checkpoint.pth"
    result = subprocess.run(
        [sys.executable, "tools/test.py", str(config), str(missing)], cwd=TREE, capture_output=True, text=True
    )
    assert result.returncode != 0 and str(missing) in result.stderr
