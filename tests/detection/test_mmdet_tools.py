"""The detection tools: our ``tools/*.py`` flags (openmmlab_tools.cli), loading mmengine checkpoints with torch's
weights_only loader, FLOP counting that includes the custom ops, and mmdet's own analysis tools on our configs."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet", reason="needs the OpenMMLab stack: bash tools/setup_env.sh --mm")
pytestmark = pytest.mark.mm

from openmmlab_tools import checkpoints, cli  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from scenes import run_mmdet_tool, write_coco, write_mask_rcnn_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "detection" / "configs" / "spatialmamba" / "mask_rcnn_spatialmamba_fpn_coco_tiny.py"


@pytest.fixture
def built(monkeypatch):
    """Captures the config the tools would build their runner from."""
    configs = []

    class Runner:
        def train(self):
            return None

        def test(self):
            return {}

    monkeypatch.setattr(cli, "_build_runner", lambda cfg: configs.append(cfg) or Runner())
    return configs


def test_train_flags_set_amp_lr_scaling_resume_and_overrides(built, tmp_path):
    cli.train(cli.MMDET, [str(TINY), "--amp", "--auto-scale-lr", "--resume", "--cfg-options", "train_cfg.max_epochs=3"])
    cfg = built[-1]
    assert cfg.optim_wrapper.type == "AmpOptimWrapper" and cfg.optim_wrapper.loss_scale == "dynamic"
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=16)
    assert cfg.resume is True and cfg.load_from is None  # --resume alone: the work dir's latest checkpoint
    assert cfg.train_cfg.max_epochs == 3
    assert cfg.work_dir == "./work_dirs/mask_rcnn_spatialmamba_fpn_coco_tiny"

    cli.train(cli.MMDET, [str(TINY), "--resume", str(tmp_path / "epoch_3.pth"), "--work-dir", str(tmp_path)])
    cfg = built[-1]
    assert (cfg.resume, cfg.load_from, cfg.work_dir) == (True, str(tmp_path / "epoch_3.pth"), str(tmp_path))
    assert cfg.optim_wrapper.type == "OptimWrapper"


def test_test_loads_the_checkpoint_without_needing_the_imagenet_file(built, tmp_path):
    checkpoint = tmp_path / "epoch_12.pth"
    checkpoint.write_bytes(b"")
    cli.test(cli.MMDET, [str(TINY), str(checkpoint)])
    cfg = built[-1]
    assert cfg.load_from == str(checkpoint)
    assert cfg.model.backbone.pretrained is None and cfg.model.backbone.init_cfg is None


def test_tta_falls_back_to_mmdet_flip_tta_on_boxes_only_for_mask_rcnn(built, tmp_path):
    checkpoint = tmp_path / "epoch_12.pth"
    checkpoint.write_bytes(b"")
    cli.test(cli.MMDET, [str(TINY), str(checkpoint), "--tta"])
    cfg = built[-1]
    # mmdet's defaults, as the official script (its configs define no TTA): DetTTAModel around the detector, the test
    # pipeline ending in a flip / no-flip TestTimeAug.
    assert cfg.model.type == "DetTTAModel" and cfg.model.module.type == "MaskRCNN"
    assert cfg.model.tta_cfg == dict(nms=dict(type="nms", iou_threshold=0.5), max_per_img=100)
    pipeline = cfg.test_dataloader.dataset.pipeline
    assert [step.type for step in pipeline[:-1]] == ["LoadImageFromFile", "Resize", "LoadAnnotations"]
    flips, packs = pipeline[-1].transforms
    assert pipeline[-1].type == "TestTimeAug" and sorted(f.prob for f in flips) == [0.0, 1.0]
    assert "flip" in packs[0].meta_keys
    # DetTTAModel asserts on masks at the first image; the mask branch and the segm metric are left out instead.
    assert cfg.model.module.roi_head.mask_head is None and cfg.model.module.roi_head.mask_roi_extractor is None
    assert cfg.test_evaluator.metric == ["bbox"]


def test_out_show_dir_and_wait_time_reach_the_evaluator_and_the_visualization_hook(built, tmp_path):
    checkpoint = tmp_path / "epoch_12.pth"
    checkpoint.write_bytes(b"")
    out = str(tmp_path / "results.pkl")
    cli.test(cli.MMDET, [str(TINY), str(checkpoint), "--out", out, "--show", "--show-dir", "vis", "--wait-time", "0.5"])
    cfg = built[-1]
    metric, dump = cfg.test_evaluator
    assert metric.type == "CocoMetric" and dump == dict(type="DumpDetResults", out_file_path=out)
    hook = cfg.default_hooks.visualization
    assert (hook.type, hook.draw, hook.show, hook.wait_time, hook.test_out_dir) == (
        "DetVisualizationHook",
        True,
        True,
        0.5,
        "vis",
    )
    with pytest.raises(ValueError, match="results.json"):
        cli.test(cli.MMDET, [str(TINY), str(checkpoint), "--out", "results.json"])


def test_data_path_moves_every_dataset_and_the_coco_annotation_files(built, tmp_path):
    cli.train(cli.MMDET, [str(TINY), "--data-path", str(tmp_path)])  # no trailing slash needed
    cfg = built[-1]
    for split in ("train", "val", "test"):
        assert getattr(cfg, f"{split}_dataloader").dataset.data_root == str(tmp_path)
    annotations = str(tmp_path / "annotations" / "instances_val2017.json")
    assert cfg.val_evaluator.ann_file == cfg.test_evaluator.ann_file == annotations
    with pytest.raises(ValueError, match="nowhere"):
        cli.train(cli.MMDET, [str(TINY), "--data-path", str(tmp_path / "nowhere")])


def test_mmengine_checkpoint_loads_with_torch_weights_only(tmp_path):
    from mmengine.logging import MessageHub

    hub = MessageHub.get_instance("spatial_mamba_test")
    for loss in (2.0, 1.0):
        hub.update_scalar("train/loss", loss)
    hub.update_info("eta", np.float64(12.5))
    path = tmp_path / "epoch_1.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": {"w": torch.ones(2)}, "message_hub": hub.state_dict()}, path)
    checkpoints.allow_mmengine_checkpoints()
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
    checkpoints.allow_mmengine_checkpoints()
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
    total = cli.flops(cli.MMDET, [str(config), "--shape", str(height), str(width)])
    assert "Flops:" in capsys.readouterr().out
    monkeypatch.setattr(flops_module, "scan_flops", lambda *args: 0)
    without_scan = cli.flops(cli.MMDET, [str(config), "--shape", str(height), str(width)])
    # Per block of stage i the scan does 7·L·D·N multiply-adds (N = 1); the official counter saw none of them.
    stages = [(depth, 2 * 16 * 2**i, (height // 4 >> i) * (width // 4 >> i)) for i, depth in enumerate((1, 2, 1, 1))]
    assert total - without_scan == sum(depth * 7 * length * d_inner for depth, d_inner, length in stages)


# --- mmdet's own tools (shipped in the installed package) on our configs ---------------------------------------------
@pytest.fixture(scope="module")
def narrow_config(tmp_path_factory):
    """The narrow Mask R-CNN of the end-to-end test on two generated COCO scenes."""
    tmp = tmp_path_factory.mktemp("mmdet_tools")
    write_coco(tmp / "coco", [("train", 2), ("val", 2)])
    return write_mask_rcnn_config(tmp / "narrow.py", tmp / "coco", None)


def test_mmdet_get_flops_builds_our_detector_from_the_config(narrow_config, tmp_path):
    from mmdet.registry import MODELS
    from mmengine.analysis.print_helper import _format_size
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    out = run_mmdet_tool("analysis_tools/get_flops.py", narrow_config, "--num-images", "1", cwd=tmp_path)
    cfg = Config.fromfile(narrow_config)
    with DefaultScope.overwrite_default_scope("mmdet"):
        params = sum(p.numel() for p in MODELS.build(cfg.model).parameters())
    # The narrow backbone and heads of the config, not a default-sized or Swin model.
    assert f"Params: {_format_size(params)}" in out, out[-2000:]
    assert re.search(r"Flops: [\d.]+[KMG]", out), out[-2000:]


def test_mmdet_benchmark_loads_the_dataset_through_our_config(narrow_config, tmp_path):
    pytest.importorskip("psutil", reason="mmdet's benchmark.py needs psutil (requirements-mm.txt)")
    # mmdet 3.3's inference benchmark moves the model to CUDA unconditionally; its dataloader and dataset benchmarks
    # run anywhere and check that the config's pipelines and imports work.
    out = run_mmdet_tool(
        "analysis_tools/benchmark.py",
        narrow_config,
        "--task",
        "dataloader",
        "--max-iter",
        "2",
        "--num-warmup",
        "0",
        "--log-interval",
        "1",
        "--cfg-options",
        "test_dataloader.num_workers=0",
        cwd=tmp_path,
    )
    assert re.search(r"Overall fps: [\d.]+ batch/s", out), out[-2000:]
