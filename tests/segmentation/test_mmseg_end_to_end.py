"""UPerNet with a narrow Spatial-Mamba backbone, end to end through the user-facing scripts on the CPU:
``segmentation/tools/train.py`` trains a few iterations with the config's own ADE20K pipelines (scaled down), and
``segmentation/tools/test.py --tta`` reports the multi-scale flip mIoU (SPEC §5.2). Data: generated digit scenes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmseg", reason="needs the OpenMMLab stack: bash tools/setup_env.sh --mm")
pytestmark = [pytest.mark.mm, pytest.mark.slow]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "detection"))
from scenes import write_ade20k  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TREE = ROOT / "segmentation"

SHRINK = 8  # image scales / 8: 64-pixel crops, a 256x64 test scale, TTA at 0.75, 1.0 and 1.25 of that


def _shrunk(pipeline):
    """The pipeline with every scale and crop size divided by SHRINK (in TestTimeAug's branches too)."""
    out = []
    for step in pipeline:
        step = dict(step)
        for key in ("scale", "crop_size"):
            if key in step:
                step[key] = tuple(v // SHRINK for v in step[key])
        if "transforms" in step:
            step["transforms"] = [_shrunk(branch) for branch in step["transforms"]]
        out.append(step)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The official tiny config, dumped with a narrow backbone and heads, BN instead of SyncBN (no distributed run
    here), the generated data, all image scales (training, test and TTA) divided by SHRINK, and a constant, higher
    learning rate so that 40 iterations learn something; the rest (AdamW, 3-scale flip TTA, IoU metric) is the
    config's own."""
    from mmengine.config import Config

    tmp = tmp_path_factory.mktemp("mmseg")
    write_ade20k(tmp / "ade", [("training", 6), ("validation", 2)])
    cfg = Config.fromfile(TREE / "configs/spatialmamba/upernet_spatialmamba_8xb2-160k_ade20k-512x512_tiny.py")
    norm_cfg = dict(type="BN", requires_grad=True)
    cfg.model.backbone.update(dims=16, depths=(1, 1, 1, 1), drop_path_rate=0.0, pretrained=None)
    cfg.model.decode_head.update(in_channels=[16, 32, 64, 128], channels=32, norm_cfg=norm_cfg)
    cfg.model.auxiliary_head.update(in_channels=64, channels=16, norm_cfg=norm_cfg)
    cfg.model.data_preprocessor.size = tuple(v // SHRINK for v in cfg.model.data_preprocessor.size)
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.update(num_workers=0, persistent_workers=False)
        loader.dataset.update(data_root=str(tmp / "ade"), pipeline=_shrunk(loader.dataset.pipeline))
    cfg.tta_pipeline = _shrunk(cfg.tta_pipeline)
    cfg.optim_wrapper.optimizer.lr = 2e-3
    cfg.param_scheduler = []
    cfg.randomness = dict(seed=0)
    cfg.train_cfg.update(max_iters=40, val_interval=100)
    cfg.default_hooks.logger.interval = 10
    cfg.default_hooks.checkpoint.interval = 40
    config = tmp / "upernet_narrow.py"
    cfg.dump(config)
    return tmp, config


def _run(args):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=TREE, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


def test_train_then_test_with_tta_reports_miou(setup):
    tmp, config = setup
    work_dir = tmp / "work"
    out = _run(["tools/train.py", config, "--work-dir", work_dir])
    assert "randomly initialised" in out  # pretrained=None is said, not silent
    (log,) = work_dir.glob("*/vis_data/scalars.json")
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines() if '"loss"' in line]
    assert len(losses) >= 4 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    checkpoint = work_dir / "iter_40.pth"
    assert checkpoint.is_file()

    out = _run(["tools/test.py", config, checkpoint, "--tta", "--work-dir", tmp / "test"])
    assert "Iter(test) [2/2]" in out
    metrics = {k: float(v) for k, v in re.findall(r"(aAcc|mIoU|mAcc): (-?[\d.]+)", out)}
    assert set(metrics) == {"aAcc", "mIoU", "mAcc"}, out[-2000:]
    # 40 iterations learn the background (about 90% of the pixels; an untrained model scores near 0 here), which
    # also shows that the labels went through reduce_zero_label and the flipped views were flipped back.
    assert metrics["aAcc"] > 70.0 and 0.0 < metrics["mIoU"] <= 100.0, metrics
