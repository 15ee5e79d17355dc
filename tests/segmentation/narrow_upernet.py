"""The official tiny UPerNet config scaled down for CPU tests, written next to generated ADE20K-layout scenes."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "segmentation/configs/spatialmamba/upernet_spatialmamba_8xb2-160k_ade20k-512x512_tiny.py"

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


def write_config(path: Path, data_root: Path, max_iters: int = 40) -> Path:
    """The tiny config with a narrow backbone and heads, the data under ``data_root``, all image scales (training,
    test and TTA) divided by SHRINK, and a constant, higher learning rate so that a few dozen iterations learn
    something; the rest (the heads' SyncBN, AdamW, 3-scale flip TTA, IoU metric) is the config's own. Returns
    ``path``."""
    from mmengine.config import Config

    cfg = Config.fromfile(TINY)
    cfg.model.backbone.update(dims=16, depths=(1, 1, 1, 1), drop_path_rate=0.0, pretrained=None)
    cfg.model.decode_head.update(in_channels=[16, 32, 64, 128], channels=32)
    cfg.model.auxiliary_head.update(in_channels=64, channels=16)
    cfg.model.data_preprocessor.size = tuple(v // SHRINK for v in cfg.model.data_preprocessor.size)
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.update(num_workers=0, persistent_workers=False)
        loader.dataset.update(data_root=str(data_root), pipeline=_shrunk(loader.dataset.pipeline))
    cfg.tta_pipeline = _shrunk(cfg.tta_pipeline)
    cfg.optim_wrapper.optimizer.lr = 2e-3
    cfg.param_scheduler = []
    cfg.randomness = dict(seed=0)
    cfg.train_cfg.update(max_iters=max_iters, val_interval=1000)
    cfg.default_hooks.logger.interval = 10
    cfg.default_hooks.checkpoint.interval = max_iters
    cfg.dump(path)
    return path
