"""UPerNet with a narrow Spatial-Mamba backbone, end to end through the user-facing scripts on the CPU:
``segmentation/tools/train.py`` trains a few iterations with the config's own ADE20K pipelines and SyncBN heads
(scaled down), and ``segmentation/tools/test.py --tta`` reports the multi-scale flip mIoU, which must beat predicting
background everywhere by a margin. mmseg's own analysis tools then run on that run folder and its label maps.
Data: generated digit scenes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmseg", reason="needs the OpenMMLab stack: bash tools/setup_env.sh --mm")
pytestmark = [pytest.mark.mm, pytest.mark.slow]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "detection"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from narrow_upernet import run_mmseg_tool, write_config  # noqa: E402
from scenes import write_ade20k  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TREE = ROOT / "segmentation"

# Two large glyphs at most per scene, of two digits only: with the background, three classes (ADE20K's first three
# names), about 13% foreground pixels. With all ten digits as small strokes, 40 iterations learned the background only.
SCENES = dict(digits=(0, 1), max_objects=2, sides=(0.4, 0.8))
NUM_CLASSES = 3
ITERS = 120
# Measured: lr 2e-3 (on slightly smaller glyphs) still predicted background everywhere after 40 iterations, 4e-3
# learns the "0" glyphs; lr 0 scores below the baseline (mIoU 27.5 against 28.9), so the assertion fails.
LR = 4e-3
# The trained model's mIoU must exceed the all-background prediction's by this many points. After 40 iterations the
# gain was at the mercy of rounding: seeds 0-3 gave +0 to +20 points, and a change of the compiled kernels' float
# contraction alone moved seed 0 from +8.7 to +2.3. After 120 (a few seconds more) seeds 0, 1, 3 and 7 gave +20.2 to
# +25.1 (the mean over 8 seeds after 80 was +23).
MARGIN = 10.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mmseg")
    write_ade20k(tmp / "ade", [("training", 6), ("validation", 2)], **SCENES)
    return tmp, write_config(tmp / "upernet_narrow.py", tmp / "ade", max_iters=ITERS, num_classes=NUM_CLASSES)


def _run(args):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=TREE, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained(setup):
    """``tools/train.py`` on the generated scenes: (work dir, console output)."""
    tmp, config = setup
    work_dir = tmp / "work"
    out = _run(["tools/train.py", config, "--work-dir", work_dir, "--cfg-options", f"optim_wrapper.optimizer.lr={LR}"])
    return work_dir, out


@pytest.fixture(scope="module")
def tested(setup, trained):
    """``tools/test.py --tta --out DIR`` on the last checkpoint: (console output, folder of predicted label maps)."""
    tmp, config = setup
    work_dir, _ = trained
    predictions = tmp / "predictions"
    out = _run(["tools/test.py", config, work_dir / f"iter_{ITERS}.pth", "--tta", "--work-dir", tmp / "test"]
               + ["--out", predictions])  # fmt: skip
    return out, predictions


def _labels(annotations: Path) -> np.ndarray:
    """The validation labels as mmseg evaluates them: ADE20K's 0 ("other") is ignored, the rest moves down by one."""
    from PIL import Image

    labels = np.concatenate([np.asarray(Image.open(p)).ravel() for p in sorted(annotations.glob("*.png"))])
    return labels[labels != 0].astype(np.int64) - 1


def _all_background_miou(labels: np.ndarray) -> float:
    """mIoU (%) of predicting background everywhere, as mmseg's IoUMetric computes it over a split: background's IoU
    is its share of the labelled pixels, each digit class present scores 0, and absent classes do not count."""
    return 100.0 * np.mean(labels == 0) / len(np.unique(labels))


def test_train_with_syncbn_heads_logs_falling_losses_and_a_checkpoint(setup, trained):
    from mmengine.config import Config

    _, config = setup
    work_dir, out = trained
    cfg = Config.fromfile(config)
    assert cfg.model.decode_head.norm_cfg.type == cfg.model.auxiliary_head.norm_cfg.type == "SyncBN"
    assert "randomly initialised" in out  # pretrained=None is said, not silent
    # Without a launcher mmengine turns the heads' SyncBN into BatchNorm, as the README says.
    assert "SyncBatchNorm (SyncBN) layers in the model will be automatically reverted" in out
    (log,) = work_dir.glob("*/vis_data/scalars.json")
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines() if '"loss"' in line]
    assert len(losses) == ITERS // 10 + 1 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert (work_dir / f"iter_{ITERS}.pth").is_file()


def test_tta_miou_beats_predicting_background_everywhere_by_a_margin(setup, tested):
    tmp, _ = setup
    out, _ = tested
    assert "Iter(test) [2/2]" in out
    metrics = {k: float(v) for k, v in re.findall(r"(aAcc|mIoU|mAcc): (-?[\d.]+)", out)}
    assert set(metrics) == {"aAcc", "mIoU", "mAcc"}, out[-2000:]
    # A model that learned nothing but the majority class scores exactly the baseline; beating it by the margin needs
    # digit pixels told apart from the background (and the labels reduced, the flipped views flipped back).
    # Measured (seed 0): mIoU 54.06 against 28.92 (background IoU 97.8, the "0" glyphs 64.4, the "1" glyphs 0).
    baseline = _all_background_miou(_labels(tmp / "ade" / "annotations" / "validation"))
    assert baseline + MARGIN < metrics["mIoU"] <= 100.0, (metrics, baseline)


# --- mmseg's own analysis tools (shipped in the installed package) on the run above ----------------------------------
def test_mmseg_analyze_logs_plots_the_training_losses_from_the_run(trained, tmp_path):
    pytest.importorskip("seaborn", reason="mmseg's analysis_tools/analyze_logs.py imports seaborn: pip install seaborn")
    from PIL import Image

    work_dir, _ = trained
    (log,) = work_dir.glob("*/vis_data/scalars.json")
    curve = tmp_path / "losses.png"
    keys = ("loss", "decode.acc_seg")
    out = run_mmseg_tool(
        "analysis_tools/analyze_logs.py", log, "--keys", *keys, "--backend", "agg", "--out", curve, cwd=tmp_path
    )
    for key in keys:
        assert f"plot curve of {log}, metric is {key}" in out, out[-2000:]
    assert f"save curve to: {curve}" in out, out[-2000:]
    drawing = np.asarray(Image.open(curve).convert("L"))
    assert drawing.shape == (480, 640) and drawing.std() > 0  # matplotlib's default 6.4x4.8 inch figure, 100 dpi


def _confusion(labels: np.ndarray, predictions: np.ndarray, n: int) -> np.ndarray:
    """Rows: ground truth, columns: prediction; labels outside [0, n) are ignored."""
    keep = (labels >= 0) & (labels < n)
    return np.bincount(n * labels[keep] + predictions[keep], minlength=n * n).reshape(n, n)


def test_mmseg_confusion_matrix_is_wrong_for_ade20k_configs(setup, tested, tmp_path):
    """mmseg 1.2.2's confusion_matrix.py on ``test.py --out`` label maps of an ADE20K config (as ours all are) is
    broken upstream, pinned here so that a fix shows up as a failure of this test:

    - ``--out`` writes the predictions in ADE20K's numbering (class + 1), the tool's dataset already reduces the ground
      truth, and the tool subtracts 1 from it once more: its matrix is the true one moved by one class on both axes,
      background's row lost (its -1 is the ignored 255);
    - it sizes the matrix and the figure from the dataset class's ``METAINFO`` (ADE20K's 150 classes), not from the
      config's classes: the 150-class figure is 300 x 240 inches at 300 dpi (about 26 GB of pixels), so its main() is
      not run here (on this 24 GiB machine it dies with ``std::bad_alloc``).
    """
    from PIL import Image

    tmp, config = setup
    _, predictions = tested
    ground_truth = sorted((tmp / "ade" / "annotations" / "validation").glob("*.png"))
    assert sorted(p.name for p in predictions.glob("*.png")) == [p.name for p in ground_truth]
    tool = Path(__import__("mmseg").__file__).parent / ".mim" / "tools" / "analysis_tools" / "confusion_matrix.py"
    # The numbers behind the tool's figure, from its own calculate_confusion_matrix() on the maps main() would read.
    code = (
        "import json, os, runpy, sys; import numpy as np; from PIL import Image; sys.modules['mmdet'] = None; "
        f"tool = runpy.run_path({str(tool)!r}); "
        "from mmengine.config import Config; cfg = Config.fromfile(sys.argv[1]); "
        "dataset = tool['DATASETS'].build(cfg.test_dataloader.dataset); "
        "maps = [np.array(Image.open(os.path.join(sys.argv[2], f))) for f in sorted(os.listdir(sys.argv[2]))]; "
        "print('CLASSES', len(dataset.metainfo['classes']), len(dataset.METAINFO['classes'])); "
        "print('MATRIX', json.dumps(tool['calculate_confusion_matrix'](dataset, maps).tolist()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(config), str(predictions)], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-6000:]
    assert f"CLASSES {NUM_CLASSES} 150" in result.stdout, result.stdout[-2000:]
    tool_matrix = np.array(json.loads(result.stdout.split("MATRIX ")[1]), dtype=np.int64)

    labels = _labels(tmp / "ade" / "annotations" / "validation")
    predicted = np.concatenate([np.asarray(Image.open(predictions / p.name)).ravel() for p in ground_truth])
    predicted = predicted[np.concatenate([np.asarray(Image.open(p)).ravel() for p in ground_truth]) != 0]
    assert predicted.min() >= 1  # ADE20K numbering: class c is written as c + 1
    n = NUM_CLASSES
    truth = _confusion(labels, predicted.astype(np.int64) - 1, n)
    assert truth.sum() == labels.size and truth[1:, :].sum() > 0  # digits are present
    # The tool's cell [i, j] counts true class i + 1 predicted as class j - 1.
    shifted = np.zeros((150, 150), np.int64)
    shifted[: n - 1, 1 : n + 1] = truth[1:, :]
    assert np.array_equal(tool_matrix, shifted), (tool_matrix[:n, : n + 1], truth)


def test_mmseg_browse_dataset_fails_upstream_drawing_the_class_names(setup, tmp_path):
    """mmseg 1.2.2's browse_dataset.py (analysis_tools/ and misc/ alike) runs the config's training pipeline, then
    draws on ``np.zeros_like`` of a permuted (not C-contiguous) tensor view, which OpenCV's ``rectangle`` refuses
    while writing the class names: it fails for every config at the first image, whatever the model. Pinned, so that
    an upstream fix shows up as a failure of this test (then check the drawings as mmdet's test does)."""
    tmp, config = setup
    browse = tmp_path / "browse"
    with pytest.raises(AssertionError) as failure:
        run_mmseg_tool("analysis_tools/browse_dataset.py", config, "--not-show", "--output-dir", browse, cwd=tmp_path)
    message = str(failure.value)
    assert "_draw_sem_seg" in message and "Layout of the output array img is incompatible with cv::Mat" in message
    assert not list(browse.glob("*.jpg"))
