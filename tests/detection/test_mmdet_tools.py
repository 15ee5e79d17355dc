"""The shared tool entry points behind detection/tools (spatial_mamba.openmmlab): command-line flags, loading
mmengine checkpoints with torch's weights_only loader, and FLOP counting that includes the custom ops (SPEC §3c)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet", reason="needs the OpenMMLab stack: bash tools/setup_env.sh --mm")
pytestmark = pytest.mark.mm

from spatial_mamba import openmmlab  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "detection" / "configs" / "spatialmamba" / "mask_rcnn_spatialmamba_fpn_coco_tiny.py"

spec = importlib.util.spec_from_file_location("detection_model", ROOT / "detection" / "model.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.fixture
def built(monkeypatch):
    """Captures the config the tools would build their runner from."""
    configs = []

    class Runner:
        def train(self):
            return None

        def test(self):
            return {}

    monkeypatch.setattr(openmmlab, "_build_runner", lambda cfg: configs.append(cfg) or Runner())
    return configs


def test_train_flags_set_amp_lr_scaling_resume_and_overrides(built, tmp_path):
    openmmlab.train([str(TINY), "--amp", "--auto-scale-lr", "--resume", "--cfg-options", "train_cfg.max_epochs=3"])
    cfg = built[-1]
    assert cfg.optim_wrapper.type == "AmpOptimWrapper" and cfg.optim_wrapper.loss_scale == "dynamic"
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=16)
    assert cfg.resume is True and cfg.load_from is None  # --resume alone: the work dir's latest checkpoint
    assert cfg.train_cfg.max_epochs == 3
    assert cfg.work_dir == "./work_dirs/mask_rcnn_spatialmamba_fpn_coco_tiny"

    openmmlab.train([str(TINY), "--resume", str(tmp_path / "epoch_3.pth"), "--work-dir", str(tmp_path)])
    cfg = built[-1]
    assert (cfg.resume, cfg.load_from, cfg.work_dir) == (True, str(tmp_path / "epoch_3.pth"), str(tmp_path))
    assert cfg.optim_wrapper.type == "OptimWrapper"


def test_test_loads_the_checkpoint_without_needing_the_imagenet_file(built, tmp_path):
    checkpoint = tmp_path / "epoch_12.pth"
    checkpoint.write_bytes(b"")
    openmmlab.test([str(TINY), str(checkpoint)])
    cfg = built[-1]
    assert cfg.load_from == str(checkpoint)
    assert cfg.model.backbone.pretrained is None and cfg.model.backbone.init_cfg is None


def test_tta_without_a_tta_setting_in_the_config_is_an_error(built, tmp_path):
    checkpoint = tmp_path / "epoch_12.pth"
    checkpoint.write_bytes(b"")
    with pytest.raises(ValueError, match="tta_model"):
        openmmlab.test([str(TINY), str(checkpoint), "--tta"])


def test_mmengine_checkpoint_loads_with_torch_weights_only(tmp_path):
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance("spatial_mamba_test")
    for loss in (2.0, 1.0):
        hub.update_scalar("train/loss", loss)
    hub.update_info("eta", np.float64(12.5))
    path = tmp_path / "epoch_1.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": {"w": torch.ones(2)}, "message_hub": hub.state_dict()}, path)
    openmmlab.allow_mmengine_checkpoints()
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["message_hub"]["log_scalars"]["train/loss"].mean() == 1.5
    assert checkpoint["message_hub"]["runtime_info"]["eta"] == 12.5


def test_weights_only_loading_still_rejects_other_getattr_calls():
    class Sneaky:
        def __reduce__(self):
            return getattr, (np.ndarray, "tofile")

    buffer = io.BytesIO()
    torch.save({"x": Sneaky()}, buffer)
    buffer.seek(0)
    openmmlab.allow_mmengine_checkpoints()
    with pytest.raises(Exception, match="tofile"):
        torch.load(buffer, weights_only=True)


def test_get_flops_counts_the_hidden_state_scan(tmp_path, monkeypatch, capsys):
    from spatial_mamba import flops as flops_module

    config = tmp_path / "narrow.py"
    config.write_text(
        f"_base_ = '{TINY}'\n"
        "model = dict(backbone=dict(dims=16, depths=(1, 2, 1, 1)), neck=dict(in_channels=[16, 32, 64, 128]))\n"
    )
    height, width = 128, 96
    total = openmmlab.flops((height, width), [str(config)])
    assert "Flops:" in capsys.readouterr().out
    monkeypatch.setattr(flops_module, "scan_flops", lambda *args: 0)
    without_scan = openmmlab.flops((height, width), [str(config)])
    # Per block of stage i the scan does 7·L·D·N multiply-adds (N = 1); the official counter saw none of them.
    stages = [(depth, 2 * 16 * 2**i, (height // 4 >> i) * (width // 4 >> i)) for i, depth in enumerate((1, 2, 1, 1))]
    assert total - without_scan == sum(depth * 7 * length * d_inner for depth, d_inner, length in stages)
