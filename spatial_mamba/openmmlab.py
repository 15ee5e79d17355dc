"""OpenMMLab plug-in shared by ``detection/`` and ``segmentation/`` (SPEC §2.4, §5).

- :class:`MMSpatialMamba`: :class:`~spatial_mamba.SpatialMambaBackbone` as an mmengine ``BaseModule``.
  ``detection/model.py`` registers it as ``MM_SpatialMamba`` in mmdet's ``MODELS`` and ``segmentation/model.py`` in
  mmseg's, so each tree needs only its own package; this module imports nothing but mmengine.
- :func:`train`, :func:`test`, :func:`flops`: the command lines behind both trees' ``tools/`` scripts, with the usual
  mmengine flags.
- :func:`allow_mmengine_checkpoints`: lets torch's ``weights_only`` loader read what mmengine writes, so testing and
  resuming work on torch >= 2.6 without unpickling arbitrary objects.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import os.path as osp
import pickle
from typing import Any, List, Sequence

import numpy as np
import torch
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import HistoryBuffer, print_log
from mmengine.model import BaseModule
from mmengine.registry import MODELS, RUNNERS, DefaultScope
from mmengine.runner import Runner
from mmengine.structures import BaseDataElement

from .checkpoint import CheckpointError
from .flops import count_flops
from .models import SpatialMamba, SpatialMambaBackbone

__all__ = ["MMSpatialMamba", "allow_mmengine_checkpoints", "train", "test", "flops"]

# Arguments of SpatialMamba that make sense for a backbone; everything else is rejected by name.
_MODEL_ARGS = tuple(
    name
    for name, p in inspect.signature(SpatialMamba.__init__).parameters.items()
    if p.kind is p.POSITIONAL_OR_KEYWORD and name not in ("self", "img_size", "num_classes", "global_pool")
)


class MMSpatialMamba(SpatialMambaBackbone, BaseModule):
    """The dense Spatial-Mamba backbone for mmdet/mmseg configs (``type='MM_SpatialMamba'``).

    Args:
        out_indices, pretrained, norm_layer, key: as in :class:`~spatial_mamba.SpatialMambaBackbone`; ``pretrained``
            is a classification checkpoint (``key='model'`` or ``'model_ema'``) and a file that is missing or does
            not hold this backbone's weights is an error, never a random backbone (official bug, SPEC §7.16).
        init_cfg: mmengine's initialisation config. ``dict(type='Pretrained', checkpoint=PATH)`` is the deferred
            form of ``pretrained=PATH`` (loaded by ``init_weights`` with the same checks); give one of the two.
        **model_kwargs: :class:`~spatial_mamba.SpatialMamba` arguments (``dims``, ``depths``, ``d_state``,
            ``drop_path_rate``, ...). Any other key is an error: the official class silently swallowed the Swin keys
            of the configs it inherited (SPEC §7.16).

    Built once: the official class ran the backbone constructor twice through its base classes (SPEC §7.17).
    """

    def __init__(
        self,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        pretrained: str | None = None,
        norm_layer: str = "ln",
        key: str = "model",
        init_cfg: dict | None = None,
        **model_kwargs,
    ):
        unknown = sorted(set(model_kwargs) - set(_MODEL_ARGS))
        if unknown:
            raise TypeError(
                f"MM_SpatialMamba got unexpected arguments {unknown}; expected out_indices, pretrained, norm_layer, "
                f"key, init_cfg or one of {list(_MODEL_ARGS)} (configs inheriting another backbone must replace it "
                "with _delete_=True)"
            )
        if pretrained is not None and init_cfg is not None:
            raise ValueError(
                f"MM_SpatialMamba got both pretrained={pretrained!r} and init_cfg={init_cfg!r}; give only one"
            )
        # The MRO runs SpatialMamba's super().__init__() into BaseModule.__init__ (init_cfg=None) and nn.Module, so
        # the network is built exactly once; init_cfg is attached afterwards.
        super().__init__(out_indices=out_indices, pretrained=pretrained, norm_layer=norm_layer, key=key, **model_kwargs)
        self.init_cfg = init_cfg
        self.pretrained, self.pretrained_key = pretrained, key

    def init_weights(self) -> None:
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get("type") == "Pretrained":
            # mmengine's own Pretrained loader reads 'state_dict' (else the whole file), not 'model', and only warns
            # about missing keys: with a classification checkpoint the backbone would stay random. Use ours instead.
            extra = sorted(set(cfg) - {"type", "checkpoint", "map_location"})
            if extra:
                raise ValueError(
                    f"MM_SpatialMamba init_cfg {dict(cfg)} has unsupported keys {extra}: it loads a classification "
                    "checkpoint; use load_from for a detector or segmentor checkpoint"
                )
            self.load_pretrained(cfg["checkpoint"], self.pretrained_key)
            self._is_init = True
            return
        if cfg is None and self.pretrained is None:
            print_log(
                "MM_SpatialMamba: neither pretrained nor init_cfg is set, the backbone is randomly initialised "
                "(unless load_from or --resume restores the whole model)",
                logger="current",
                level=logging.WARNING,
            )
        super().init_weights()


def _history_buffer_statistic(owner: Any, name: str) -> Any:
    """Stands in for ``getattr`` while unpickling: mmengine pickles each ``HistoryBuffer``'s statistics methods as
    ``getattr(HistoryBuffer, 'mean')`` and so on. Only those resolve; a real ``getattr`` would reach any object."""
    # The four built-in statistics, and any registered with HistoryBuffer.register_statistics.
    if owner is HistoryBuffer and name in {"min", "max", "current", "mean", *HistoryBuffer._statistics_methods}:
        return getattr(owner, name)
    raise pickle.UnpicklingError(
        f"checkpoint asks for getattr({owner!r}, {name!r}); only HistoryBuffer statistics methods are allowed"
    )


def allow_mmengine_checkpoints() -> None:
    """Allow-lists for ``torch.load(weights_only=True)`` the non-tensor objects mmengine writes into checkpoints.

    torch >= 2.6 loads with ``weights_only=True`` and mmengine 0.10 does not say otherwise, so its own checkpoints
    (message hub ``HistoryBuffer`` objects holding numpy arrays) fail to load for testing or resuming. Allowing these
    few types keeps the protection against code in downloaded checkpoints, which ``weights_only=False`` would drop.
    """
    numpy_core = getattr(np, "_core", None) or np.core
    scalar_types = [np.float64, np.float32, np.int64, np.int32, np.bool_]
    torch.serialization.add_safe_globals(
        [
            HistoryBuffer,
            (_history_buffer_statistic, "builtins.getattr"),
            numpy_core.multiarray._reconstruct,
            numpy_core.multiarray.scalar,
            np.ndarray,
            np.dtype,
            *scalar_types,
            *(type(np.dtype(t)) for t in scalar_types),
        ]
    )


# --- command lines ---------------------------------------------------------------------------------------------------
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


def _drop_imagenet_weights(cfg: Config) -> bool:
    """Clears the backbone's ImageNet checkpoint (``pretrained``/``init_cfg``); returns whether there was one."""
    backbone = cfg.model.backbone
    had = bool(cfg.model.get("pretrained") or backbone.get("pretrained") or backbone.get("init_cfg"))
    if "pretrained" in cfg.model:  # mmseg's EncoderDecoder forwards its own ``pretrained`` to the backbone
        cfg.model.pretrained = None
    backbone.pretrained, backbone.init_cfg = None, None
    return had


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


def train(argv: List[str] | None = None) -> None:
    """``tools/train.py CONFIG [--work-dir DIR] [--amp] [--auto-scale-lr] [--resume [CKPT]] [--cfg-options ...]``."""
    parser = argparse.ArgumentParser(description="Train a Spatial-Mamba detector or segmentor")
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
    _common_args(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    cfg = _config(args)
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


def test(argv: List[str] | None = None) -> dict:
    """``tools/test.py CONFIG CHECKPOINT [--tta] [--work-dir DIR] [--cfg-options ...]``; returns the metrics."""
    parser = argparse.ArgumentParser(description="Evaluate a Spatial-Mamba detector or segmentor")
    parser.add_argument("config", help="config file")
    parser.add_argument("checkpoint", help="checkpoint written by tools/train.py (or a released one)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation: the config's tta_model/pipeline")
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
    if args.tta:
        missing = [k for k in ("tta_model", "tta_pipeline") if k not in cfg]
        if missing:
            raise ValueError(f"--tta needs {' and '.join(missing)} in {args.config}")
        dataset = cfg.test_dataloader.dataset
        while "dataset" in dataset:  # dataset wrappers
            dataset = dataset.dataset
        dataset.pipeline = cfg.tta_pipeline
        cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    return _build_runner(cfg).test()


def flops(default_shape: Sequence[int], argv: List[str] | None = None) -> int:
    """``tools/get_flops.py CONFIG [--shape H W]``: parameters and FLOPs of one inference on an H x W input.

    FLOPs follow the fvcore convention of the official numbers (one multiply-add = 1 FLOP, SPEC §3c) and include the
    custom ops, which the official mmengine counter could not see: the hidden-state scan (7·B·L·D·N) and the state
    fusion, counted as the merged 11x11 depthwise kernel that inference runs (all 121 taps, like the official kernel).
    """
    parser = argparse.ArgumentParser(description="Parameters and FLOPs of a Spatial-Mamba detector or segmentor")
    parser.add_argument("config", help="config file")
    parser.add_argument(
        "--shape", type=int, nargs=2, default=list(default_shape), metavar=("H", "W"), help="input size"
    )
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config entries")
    args = parser.parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    # Padded like the data preprocessor pads a batch (mmdet: to a multiple of 32, which FPN needs).
    divisor = cfg.model.get("data_preprocessor", {}).get("pad_size_divisor", 1)
    height, width = (-(-size // divisor) * divisor for size in args.shape)
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
