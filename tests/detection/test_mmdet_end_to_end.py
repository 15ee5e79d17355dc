"""Mask R-CNN with a narrow Spatial-Mamba backbone, end to end through the user-facing scripts on the CPU:
``detection/tools/train.py`` trains a few iterations from a classification checkpoint, resumes, and
``detection/tools/test.py`` reports COCO bbox and segm mAP above the untrained detector's, and box mAP with mmdet's
flip TTA. Data: generated digit scenes (scenes.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet", reason="needs the OpenMMLab stack: bash tools/setup_env.sh --mm")
pytestmark = [pytest.mark.mm, pytest.mark.slow]

sys.path.insert(0, str(Path(__file__).parent))
from scenes import run_mmdet_tool, write_coco, write_mask_rcnn_config  # noqa: E402

from spatial_mamba import SpatialMamba  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TREE = ROOT / "detection"


def _run(args, cwd=TREE):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


def _scalars(log: Path):
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mmdet")
    write_coco(tmp / "coco", [("train", 8), ("val", 4)])
    pretrained = tmp / "latest_ckpt.pth"
    torch.manual_seed(0)
    classifier = SpatialMamba(dims=16, depths=(1, 1, 1, 1), num_classes=10)
    torch.save({"model": classifier.state_dict(), "epoch": 299}, pretrained)
    config = write_mask_rcnn_config(tmp / "mask_rcnn_narrow.py", tmp / "coco", pretrained)
    return tmp, config


@pytest.fixture(scope="module")
def trained(setup):
    """``tools/train.py`` for 6 epochs, then ``--resume`` to 18: (work dir, first output, resumed output)."""
    tmp, config = setup
    work_dir = tmp / "work"
    first = _run(["tools/train.py", config, "--work-dir", work_dir])
    resume = ["--resume", "--cfg-options", "train_cfg.max_epochs=18"]
    resumed = _run(["tools/train.py", config, "--work-dir", work_dir, *resume])
    return work_dir, first, resumed


@pytest.fixture(scope="module")
def tested(setup, trained):
    """``tools/test.py --out results.pkl`` on the last checkpoint: (COCO metrics, results file)."""
    tmp, config = setup
    work_dir, _, _ = trained
    results = tmp / "results.pkl"
    return _test(config, work_dir / "epoch_18.pth", tmp / "test", "--out", results), results


def test_train_resume_and_test_report_coco_bbox_and_segm_map(setup, trained, tested):
    tmp, config = setup
    work_dir, first, resumed = trained
    assert "backbone weights loaded from" in first
    first_log = sorted(work_dir.glob("*/vis_data/scalars.json"))[0]
    losses = [s["loss"] for s in _scalars(first_log) if "loss" in s]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))  # 6 epochs of 4 batches, logged every 4

    # --resume reads the mmengine checkpoint back (torch weights_only loading) and continues at epoch 7.
    assert "resumed epoch: 6, iter: 24" in resumed, resumed[-2000:]
    checkpoint = work_dir / "epoch_18.pth"
    assert checkpoint.is_file()

    trained_metrics, _ = tested
    assert {"bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50"} <= set(trained_metrics), trained_metrics
    assert all(0.0 <= v <= 1.0 for v in trained_metrics.values()), trained_metrics
    # The detector training starts from (ImageNet backbone, random heads), scored the same way.
    untrained = _test(config, _untrained_checkpoint(config, tmp / "untrained.pth"), tmp / "test_untrained")
    # Measured: box AP50 0.23 to 0.34 against 0.003 untrained.
    assert trained_metrics["bbox_mAP_50"] > untrained["bbox_mAP_50"] + 0.05, (trained_metrics, untrained)
    # Masks are learnt later: after these 18 epochs their AP is at the edge of rising from 0 (segm AP50 0.067 on the
    # reference ops, 0.000 on the compiled CPU kernels, whose gradients agree with the reference's to 3e-5 and whose
    # loss curves match to 0.002), so the mask head's learning is asserted on its loss: 0.81 -> 0.56 measured.
    resumed_log = sorted(work_dir.glob("*/vis_data/scalars.json"))[-1]
    mask_losses = [s["loss_mask"] for log in (first_log, resumed_log) for s in _scalars(log) if "loss_mask" in s]
    assert len(mask_losses) == 18 and mask_losses[-1] < 0.8 * mask_losses[0], mask_losses

    # --tta: mmdet's flip TTA, which merges boxes only (masks left out, with a warning).
    out = _run(["tools/test.py", config, checkpoint, "--tta", "--work-dir", tmp / "tta"])
    assert "cannot merge instance masks" in out
    tta = {k: float(v) for k, v in re.findall(r"coco/(\w+_mAP(?:_50)?): (-?[\d.]+)", out)}
    assert "bbox_mAP_50" in tta and not any(k.startswith("segm") for k in tta), out[-2000:]
    assert tta["bbox_mAP_50"] > untrained["bbox_mAP_50"] + 0.05, (tta, untrained)


def _test(config: Path, checkpoint: Path, work_dir: Path, *flags) -> dict:
    out = _run(["tools/test.py", config, checkpoint, "--work-dir", work_dir, *flags])
    assert "Epoch(test) [4/4]" in out
    return {k: float(v) for k, v in re.findall(r"coco/(\w+_mAP(?:_50)?): (-?[\d.]+)", out)}


def _untrained_checkpoint(config: Path, path: Path) -> Path:
    """The detector as ``tools/train.py`` builds it before its first step (same seed, ImageNet backbone)."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    cfg = Config.fromfile(config)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope("mmdet"):
        detector = MODELS.build(cfg.model)
    detector.init_weights()
    torch.save({"state_dict": detector.state_dict()}, path)
    return path


def test_test_script_rejects_a_missing_checkpoint_naming_it(setup):
    tmp, config = setup
    missing = tmp / "no_such_checkpoint.pth"
    result = subprocess.run(
        [sys.executable, "tools/test.py", str(config), str(missing)], cwd=TREE, capture_output=True, text=True
    )
    assert result.returncode != 0 and str(missing) in result.stderr


# --- mmdet's own analysis tools (shipped in the installed package) on the run above ----------------------------------
def test_mmdet_analyze_logs_plots_curves_and_times_iterations_of_the_run(trained, tmp_path):
    pytest.importorskip("seaborn", reason="mmdet's analysis_tools/analyze_logs.py imports seaborn: pip install seaborn")
    from PIL import Image

    work_dir, _, _ = trained
    log = sorted(work_dir.glob("*/vis_data/scalars.json"))[0]
    curve = tmp_path / "losses.png"
    keys = ("loss", "loss_cls")
    out = run_mmdet_tool(
        "analysis_tools/analyze_logs.py", "plot_curve", log, "--keys", *keys, "--backend", "agg", "--out", curve,
        cwd=tmp_path,
    )  # fmt: skip
    for key in keys:
        assert f"plot curve of {log}, metric is {key}" in out, out[-2000:]
    drawing = np.asarray(Image.open(curve).convert("L"))
    assert drawing.shape == (480, 640) and drawing.std() > 0  # matplotlib's default 6.4x4.8 inch figure, 100 dpi

    # One record per epoch (4 iterations logged every 4): the tool's default drops each epoch's first record, which
    # would leave nothing; --include-outliers keeps them. The tool files each record under the previous record's
    # epoch, so the validation record mmengine appends after the last epoch becomes an epoch of its own without
    # times (average: nan); the training records alone are what it expects.
    records = [s for s in _scalars(log) if "loss" in s]
    training = tmp_path / "training.json"
    training.write_text("".join(json.dumps(s) + "\n" for s in records))
    out = run_mmdet_tool(
        "analysis_tools/analyze_logs.py", "cal_train_time", training, "--include-outliers", cwd=tmp_path
    )
    times = [s["time"] for s in records]
    average = float(re.search(r"average iter time: ([\d.]+) s/iter", out).group(1))
    assert min(times) - 1e-4 <= average <= max(times) + 1e-4, (average, times)


def test_mmdet_confusion_matrix_counts_the_results_file_against_the_annotations(setup, tested, tmp_path):
    from PIL import Image

    tmp, config = setup
    _, results = tested
    tool = Path(__import__("mmdet").__file__).parent / ".mim" / "tools" / "analysis_tools" / "confusion_matrix.py"
    # The tool's main() draws the figure; its calculate_confusion_matrix() gives the numbers behind it, here with a
    # score threshold above every score: no detection counts, so each ground-truth box is a miss of its class.
    code = (
        "import json, runpy, sys; sys.modules['mmseg'] = None; "
        f"tool = runpy.run_path({str(tool)!r}); sys.argv = ['confusion_matrix.py', *sys.argv[1:]]; tool['main'](); "
        "from mmengine.config import Config; from mmengine.fileio import load; cfg = Config.fromfile(sys.argv[1]); "
        "dataset = tool['DATASETS'].build(cfg.test_dataloader.dataset); "
        "m = tool['calculate_confusion_matrix'](dataset, load(sys.argv[2]), 1.01); "
        "print('MATRIX', json.dumps(m.tolist()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(config), str(results), str(tmp_path / "figure"), "--score-thr", "0.05"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    # 10 digit classes and background: (0.5 x 11, 0.4 x 11) inches at 180 dpi.
    assert Image.open(tmp_path / "figure" / "confusion_matrix.png").size == (990, 792)
    matrix = np.array(json.loads(result.stdout.split("MATRIX ")[1]))
    annotations = json.loads((tmp / "coco" / "annotations" / "instances_val2017.json").read_text())["annotations"]
    per_class = np.bincount([a["category_id"] - 1 for a in annotations], minlength=10)
    assert matrix.shape == (11, 11) and np.array_equal(matrix[:10, 10], per_class) and matrix.sum() == per_class.sum()


def test_mmdet_browse_dataset_draws_the_training_pipeline_output(setup, tmp_path):
    from PIL import Image

    tmp, config = setup
    run_mmdet_tool(
        "analysis_tools/browse_dataset.py", config, "--not-show", "--output-dir", tmp_path / "browse", cwd=tmp_path
    )
    drawings = sorted((tmp_path / "browse").glob("*.jpg"))
    assert [p.name for p in drawings] == sorted(p.name for p in (tmp / "coco" / "train2017").glob("*.jpg"))
    # Resize to (128, 96) keeps the 96-pixel squares as they are; the drawn boxes and masks change the pixels.
    for drawing in drawings:
        drawn = np.asarray(Image.open(drawing), dtype=np.float64)
        source = np.asarray(Image.open(tmp / "coco" / "train2017" / drawing.name), dtype=np.float64)
        assert drawn.shape == source.shape
        # Either flip; measured: 6 or more, where re-encoding the source alone differs by less than 0.6.
        assert min(np.abs(drawn - source).mean(), np.abs(drawn - source[:, ::-1]).mean()) > 2.0
