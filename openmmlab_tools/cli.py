"""``tools/train.py``, ``tools/test.py`` and ``tools/get_flops.py`` of the detection and segmentation trees.

The flags are those of mmdet's and mmseg's own tools (and of the official Spatial-Mamba trees built on them); what
differs between the two trees is in :data:`MMDET` and :data:`MMSEG`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import os.path as osp
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import print_log
from mmengine.registry import MODELS, RUNNERS, DefaultScope
from mmengine.runner import Runner
from mmengine.structures import BaseDataElement

from spatial_mamba.checkpoint import CheckpointError
from spatial_mamba.flops import count_flops

from .checkpoints import allow_mmengine_checkpoints

__all__ = ["MMDET", "MMSEG", "Tree", "flops", "test", "train"]


@dataclass(frozen=True)
class Tree:
    """What differs between the detection and the segmentation tools."""

    scope: str  # the configs' default_scope: "mmdet" or "mmseg"
    task: str  # "detector" or "segmentor", for messages
    flops_shape: Tuple[int, int]  # (H, W) of the official FLOP numbers


MMDET = Tree(scope="mmdet", task="detector", flops_shape=(1280, 800))
MMSEG = Tree(scope="mmseg", task="segmentor", flops_shape=(2048, 512))


# --- config helpers ---------------------------------------------------------------------------------------------------
def _config(args: argparse.Namespace) -> Config:
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    return cfg


def _innermost(dataset: ConfigDict) -> ConfigDict:
    """The dataset inside any wrappers (RepeatDataset, ClassBalancedDataset, ...)."""
    while "dataset" in dataset:
        dataset = dataset.dataset
    return dataset


def _drop_imagenet_weights(cfg: Config) -> bool:
    """Clears the backbone's ImageNet checkpoint (``pretrained``/``init_cfg``); returns whether there was one."""
    backbone = cfg.model.backbone
    had = bool(cfg.model.get("pretrained") or backbone.get("pretrained") or backbone.get("init_cfg"))
    if "pretrained" in cfg.model:  # mmseg's EncoderDecoder forwards its own ``pretrained`` to the backbone
        cfg.model.pretrained = None
    backbone.pretrained, backbone.init_cfg = None, None
    return had


def _set_data_path(cfg: Config, path: str) -> None:
    """``--data-path``: every dataloader's ``data_root`` and the COCO evaluators' annotation file move to ``path``.

    The official option concatenated strings and needed a trailing slash; the path is joined here instead.
    """
    if not osp.isdir(path):
        raise ValueError(f"--data-path {path!r} is not a directory; expected the dataset root")
    for split in ("train", "val", "test"):
        loader = cfg.get(f"{split}_dataloader")
        if not loader:
            continue
        dataset = _innermost(loader.dataset)
        dataset.data_root = path
        evaluator = cfg.get(f"{split}_evaluator")
        for metric in evaluator if isinstance(evaluator, list) else [evaluator] if evaluator else []:
            if metric.get("ann_file") and dataset.get("ann_file"):
                metric.ann_file = osp.join(path, dataset.ann_file)


# --- logging and runner -----------------------------------------------------------------------------------------------
class _MMEngineLogHandler(logging.Handler):
    """Passes the package's log records (checkpoint loading, op backends) on to mmengine's console and log file."""

    def emit(self, record: logging.LogRecord) -> None:
        print_log(self.format(record), logger="current", level=record.levelno)


def _log_through_mmengine() -> None:
    logger = logging.getLogger("spatial_mamba")
    if not any(isinstance(h, _MMEngineLogHandler) for h in logger.handlers):
        logger.addHandler(_MMEngineLogHandler())
        logger.setLevel(logging.INFO)


def _build_runner(cfg: Config) -> Runner:
    allow_mmengine_checkpoints()
    _log_through_mmengine()
    return Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", help="directory for logs and checkpoints (default ./work_dirs/<config name>)")
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        help="override config entries, e.g. train_dataloader.batch_size=4 model.backbone.pretrained=ckpt.pth",
    )
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    # torch.distributed.launch passes --local_rank (or --local-rank); mmengine reads LOCAL_RANK from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)


# --- train ------------------------------------------------------------------------------------------------------------
def train(tree: Tree, argv: List[str] | None = None) -> None:
    """``tools/train.py CONFIG [--work-dir DIR] [--amp] [--auto-scale-lr] [--resume [CKPT]] [--data-path DIR]
    [--cfg-options ...] [--launcher ...]``."""
    parser = argparse.ArgumentParser(description=f"Train a Spatial-Mamba {tree.task}")
    parser.add_argument("config", help="config file")
    parser.add_argument("--amp", action="store_true", help="mixed-precision training (AmpOptimWrapper)")
    parser.add_argument(
        "--auto-scale-lr",
        action="store_true",
        help="scale the learning rate by (GPUs x batch per GPU) / auto_scale_lr.base_batch_size",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        help="resume from CKPT, or from the latest checkpoint in the work dir when no path is given",
    )
    parser.add_argument(
        "--data-path",
        help="dataset root: replaces every dataloader's data_root (and the COCO evaluators' ann_file, joined to it)",
    )
    _common_args(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    cfg = _config(args)
    if args.data_path is not None:
        _set_data_path(cfg, args.data_path)
    if args.amp:
        if cfg.optim_wrapper.get("type", "OptimWrapper") != "AmpOptimWrapper":
            cfg.optim_wrapper.type = "AmpOptimWrapper"
            cfg.optim_wrapper.loss_scale = "dynamic"
    if args.auto_scale_lr:
        if "base_batch_size" not in cfg.get("auto_scale_lr", {}):
            raise ValueError(f"--auto-scale-lr needs auto_scale_lr.base_batch_size in {args.config}")
        cfg.auto_scale_lr.enable = True
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    _build_runner(cfg).train()


# --- test -------------------------------------------------------------------------------------------------------------
def _detection_tta(cfg: Config, config: str) -> None:
    """mmdet's ``--tta`` defaults, which the official detection configs relied on (they define no TTA): flip TTA
    merged by ``DetTTAModel``. ``DetTTAModel`` merges boxes only and stops at the first image with masks, so for
    Mask R-CNN the TTA run predicts and scores boxes only, and says so."""
    if "tta_model" not in cfg:
        print_log(f"--tta: {config} has no tta_model, using mmdet's DetTTAModel (NMS 0.5, 100 boxes)", "current")
        cfg.tta_model = dict(type="DetTTAModel", tta_cfg=dict(nms=dict(type="nms", iou_threshold=0.5), max_per_img=100))
    if "tta_pipeline" not in cfg:
        print_log(f"--tta: {config} has no tta_pipeline, using the test pipeline with and without a flip", "current")
        pipeline = copy.deepcopy(_innermost(cfg.test_dataloader.dataset).pipeline)
        meta_keys = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor", "flip", "flip_direction")
        pipeline[-1] = dict(
            type="TestTimeAug",
            transforms=[
                [dict(type="RandomFlip", prob=1.0), dict(type="RandomFlip", prob=0.0)],
                [dict(type="PackDetInputs", meta_keys=meta_keys)],
            ],
        )
        cfg.tta_pipeline = pipeline
    roi_head = cfg.model.get("roi_head") or {}
    if cfg.tta_model.type == "DetTTAModel" and roi_head.get("mask_head"):
        print_log(
            "--tta: mmdet's DetTTAModel cannot merge instance masks; testing boxes only (mask head and segm metric "
            "left out)",
            "current",
            level=logging.WARNING,
        )
        roi_head.mask_head = roi_head.mask_roi_extractor = None
        evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
        for metric in evaluators:
            kinds = metric.get("metric")
            if isinstance(kinds, (list, tuple)) and "segm" in kinds:
                metric.metric = [k for k in kinds if k != "segm"]
            elif kinds == "segm":
                raise ValueError(f"--tta: {config} evaluates masks only, which mmdet's DetTTAModel cannot merge")


def _tta(cfg: Config, tree: Tree, config: str) -> None:
    if tree is MMDET:
        _detection_tta(cfg, config)
    missing = [k for k in ("tta_model", "tta_pipeline") if k not in cfg]
    if missing:
        raise ValueError(f"--tta needs {' and '.join(missing)} in {config}")
    _innermost(cfg.test_dataloader.dataset).pipeline = cfg.tta_pipeline
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)


def _show(cfg: Config, tree: Tree, show: bool, show_dir: str | None, wait_time: float) -> None:
    """``--show``/``--show-dir``: draw the predictions with the config's visualization hook, as mmdet's and mmseg's
    test scripts do."""
    hook = cfg.default_hooks.get("visualization")
    if hook is None:
        raise ValueError("--show/--show-dir need default_hooks.visualization in the config (mmdet/mmseg's runtime)")
    hook.draw = True
    if show:
        hook.show, hook.wait_time = True, wait_time
    if show_dir:
        if tree is MMDET:
            hook.test_out_dir = show_dir  # relative to the run folder, as in mmdet
        else:
            cfg.visualizer.save_dir = show_dir


def _out(cfg: Config, tree: Tree, out: str) -> None:
    """``--out``: mmdet dumps the raw predictions into a pickle file; mmseg writes the predicted label maps (PNG)
    into a folder, for offline evaluation or submission."""
    if tree is MMDET:
        if not out.endswith((".pkl", ".pickle")):
            raise ValueError(f"--out {out!r}: expected a .pkl or .pickle file for the dumped predictions")
        evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
        cfg.test_evaluator = [*evaluators, dict(type="DumpDetResults", out_file_path=out)]
    else:
        cfg.test_evaluator.output_dir, cfg.test_evaluator.keep_results = out, True


def test(tree: Tree, argv: List[str] | None = None) -> dict:
    """``tools/test.py CONFIG CHECKPOINT [--out OUT] [--show] [--show-dir DIR] [--wait-time S] [--tta]
    [--work-dir DIR] [--cfg-options ...] [--launcher ...]``; returns the metrics."""
    parser = argparse.ArgumentParser(description=f"Evaluate a Spatial-Mamba {tree.task}")
    parser.add_argument("config", help="config file")
    parser.add_argument("checkpoint", help="checkpoint written by tools/train.py (or a released one)")
    out_help = "pickle file for the raw predictions" if tree is MMDET else "folder for the predicted label maps"
    parser.add_argument("--out", help=out_help)
    parser.add_argument("--show", action="store_true", help="show the predictions in a window")
    parser.add_argument("--show-dir", help="save images with the predictions drawn, under the run folder")
    parser.add_argument("--wait-time", type=float, default=2, help="seconds each image is shown with --show")
    tta_help = (
        "test-time augmentation: the config's tta_model/tta_pipeline, or mmdet's flip TTA (boxes only)"
        if tree is MMDET
        else "test-time augmentation: the config's tta_model/tta_pipeline (multi-scale + flip, the 'ms' numbers)"
    )
    parser.add_argument("--tta", action="store_true", help=tta_help)
    _common_args(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if not osp.isfile(args.checkpoint):
        raise CheckpointError(f"checkpoint file not found: {args.checkpoint!r}")

    cfg = _config(args)
    cfg.load_from = args.checkpoint
    if _drop_imagenet_weights(cfg):
        # The checkpoint replaces every weight; the ImageNet file need not exist on the test machine.
        print_log("tools/test.py: not loading the backbone's ImageNet weights, the checkpoint holds all weights")
    if args.show or args.show_dir:
        _show(cfg, tree, args.show, args.show_dir, args.wait_time)
    if args.tta:
        _tta(cfg, tree, args.config)
    if args.out is not None:
        _out(cfg, tree, args.out)
    return _build_runner(cfg).test()


# --- FLOPs ------------------------------------------------------------------------------------------------------------
def flops(tree: Tree, argv: List[str] | None = None) -> int:
    """``tools/get_flops.py CONFIG [--shape H W]``: parameters and FLOPs of one inference on an H x W input.

    FLOPs follow the fvcore convention of the official numbers (one multiply-add = 1 FLOP) and include the custom
    ops, which the official mmengine counter could not see: the hidden-state scan (7·B·L·D·N) and the state fusion,
    counted as the merged 11x11 depthwise kernel that inference runs (all 121 taps, like the official kernel).
    """
    parser = argparse.ArgumentParser(description=f"Parameters and FLOPs of a Spatial-Mamba {tree.task}")
    parser.add_argument("config", help="config file")
    parser.add_argument(
        "--shape", type=int, nargs=2, default=list(tree.flops_shape), metavar=("H", "W"), help="input size"
    )
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config entries")
    args = parser.parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    return _count(cfg, args.shape)


def _count(cfg: Config, shape: Sequence[int]) -> int:
    # Padded like the data preprocessor pads a batch (mmdet: to a multiple of 32, which FPN needs).
    divisor = cfg.model.get("data_preprocessor", {}).get("pad_size_divisor", 1)
    height, width = (-(-size // divisor) * divisor for size in shape)
    _drop_imagenet_weights(cfg)
    # A detector's RoI heads cost depends on how many boxes it keeps, i.e. on its random weights: a fixed seed makes
    # the count repeatable.
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(cfg.get("default_scope")):
        model = MODELS.build(cfg.model)
    meta = dict(
        img_shape=(height, width),
        ori_shape=(height, width),
        pad_shape=(height, width),
        batch_input_shape=(height, width),
        scale_factor=(1.0, 1.0),
    )
    samples = [BaseDataElement(metainfo=meta)]
    total = count_flops(
        model, (3, height, width), train=False, forward=lambda m, image: m(image, samples, mode="tensor")
    )
    params = sum(p.numel() for p in model.parameters())
    print(f"Input shape: (3, {height}, {width})\nFlops: {total / 1e9:.1f}G\nParams: {params / 1e6:.1f}M")
    return total
