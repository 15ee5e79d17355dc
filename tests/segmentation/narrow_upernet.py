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


def write_config(path: Path, data_root: Path, max_iters: int = 40, num_classes: int | None = None) -> Path:
    """The tiny config with a narrow backbone and heads, the data under ``data_root``, all image scales (training,
    test and TTA) divided by SHRINK, and a constant, higher learning rate so that a few dozen iterations learn
    something; the rest (the heads' SyncBN, AdamW, 3-scale flip TTA, IoU metric) is the config's own. With
    ``num_classes``, the datasets keep only ADE20K's first ``num_classes`` classes (mmseg maps every other label to
    the ignored 255) and the heads predict that many. Returns ``path``."""
    from mmengine.config import Config
    from mmseg.datasets import ADE20KDataset

    cfg = Config.fromfile(TINY)
    cfg.model.backbone.update(dims=16, depths=(1, 1, 1, 1), drop_path_rate=0.0, pretrained=None)
    cfg.model.decode_head.update(in_channels=[16, 32, 64, 128], channels=32)
    cfg.model.auxiliary_head.update(in_channels=64, channels=16)
    cfg.model.data_preprocessor.size = tuple(v // SHRINK for v in cfg.model.data_preprocessor.size)
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.update(num_workers=0, persistent_workers=False)
        loader.dataset.update(data_root=str(data_root), pipeline=_shrunk(loader.dataset.pipeline))
        if num_classes is not None:
            loader.dataset.metainfo = dict(classes=ADE20KDataset.METAINFO["classes"][:num_classes])
    if num_classes is not None:
        cfg.model.decode_head.num_classes = cfg.model.auxiliary_head.num_classes = num_classes
    cfg.tta_pipeline = _shrunk(cfg.tta_pipeline)
    cfg.optim_wrapper.optimizer.lr = 2e-3
    cfg.param_scheduler = []
    cfg.randomness = dict(seed=0)
    cfg.train_cfg.update(max_iters=max_iters, val_interval=1000)
    cfg.default_hooks.logger.interval = 10
    cfg.default_hooks.checkpoint.interval = max_iters
    cfg.dump(path)
    return path


def run_mmseg_tool(tool: str, *args, cwd: Path, first_on_path: tuple = ()) -> str:
    """Runs ``mmseg/.mim/tools/<tool>`` unchanged, from outside the repository, with mmdet made unimportable: only
    the config's ``custom_imports`` can register the backbone. ``first_on_path``: folders put before the venv's
    packages (another mmengine)."""
    import subprocess
    import sys

    import mmseg

    path = Path(mmseg.__file__).parent / ".mim" / "tools" / tool
    code = (
        f"import runpy, sys; sys.path[:0] = {list(map(str, first_on_path))!r}; sys.modules['mmdet'] = None; "
        f"sys.argv = {[str(path), *map(str, args)]!r}; runpy.run_path({str(path)!r}, run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{tool} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr
