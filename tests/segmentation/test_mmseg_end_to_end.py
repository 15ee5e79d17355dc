"""UPerNet with a narrow Spatial-Mamba backbone, end to end through the user-facing scripts on the CPU:
``segmentation/tools/train.py`` trains a few iterations with the config's own ADE20K pipeline, and
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

# The official tiny config with a narrow backbone and heads; data pipelines (512x512 crops, (2048, 512) test scale,
# the 3-scale flip TTA) stay the config's own. SyncBN needs a distributed GPU run, so the heads use BN here.
TEST_CONFIG = """
_base_ = "{base}"
data_root = "{data}/"
norm_cfg = dict(type="BN", requires_grad=True)
model = dict(
    backbone=dict(dims=16, depths=(1, 1, 1, 1), drop_path_rate=0.0, pretrained=None),
    decode_head=dict(in_channels=[16, 32, 64, 128], channels=32, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=64, channels=16, norm_cfg=norm_cfg),
)
train_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=4, val_interval=100)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=4))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mmseg")
    write_ade20k(tmp / "ade", [("training", 6), ("validation", 3)])
    config = tmp / "upernet_narrow.py"
    config.write_text(
        TEST_CONFIG.format(
            base=TREE / "configs/spatialmamba/upernet_spatialmamba_8xb2-160k_ade20k-512x512_tiny.py",
            data=tmp / "ade",
        )
    )
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
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    checkpoint = work_dir / "iter_4.pth"
    assert checkpoint.is_file()

    out = _run(["tools/test.py", config, checkpoint, "--tta", "--work-dir", tmp / "test"])
    metrics = dict(re.findall(r"(aAcc|mIoU|mAcc): (-?[\d.]+)", out))
    assert set(metrics) == {"aAcc", "mIoU", "mAcc"}, out[-2000:]
    assert all(0.0 <= float(v) <= 100.0 for v in metrics.values()), metrics
    assert "Epoch(test) [3/3]" in out
