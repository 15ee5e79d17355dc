"""Loading checkpoints in the official layout (``save_checkpoint_ema`` in the official
``classification/utils/utils.py``), plain and DDP-prefixed state dicts, and bad files."""

import pytest
import torch
from yacs.config import CfgNode

from spatial_mamba import CheckpointError, SpatialMamba, load_checkpoint
from spatial_mamba.checkpoint import load_file


def _model(dims=16, seed=0):
    torch.manual_seed(seed)
    return SpatialMamba(dims=dims, depths=(1, 1, 1, 1), num_classes=7).eval()


def _official_file(path, model, ema=None):
    config = CfgNode({"MODEL": CfgNode({"NAME": "spatial_mamba_tiny", "SPATIALMAMBA": CfgNode({"D_STATE": 1})})})
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3, 16, 16)).sum().backward()
    optimizer.step()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": {"t_in_epochs": False, "base_values": [1e-3]},
            "max_accuracy": 81.5,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0},
            "epoch": 3,
            "config": config,
            "steps": 0,
            **({"model_ema": ema.state_dict(), "max_accuray_ema": 80.0} if ema is not None else {}),
        },
        path,
    )


def test_official_layout_loads_strictly_with_the_yacs_config(tmp_path):
    src, ema = _model(seed=0), _model(seed=1)
    _official_file(tmp_path / "best_ckpt.pth", src, ema)
    ckpt = load_file(tmp_path / "best_ckpt.pth")
    assert isinstance(ckpt["config"], CfgNode) and ckpt["config"].MODEL.NAME == "spatial_mamba_tiny"
    dst = _model(seed=2)
    load_checkpoint(dst, tmp_path / "best_ckpt.pth")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    load_checkpoint(dst, tmp_path / "best_ckpt.pth", key="model_ema")
    torch.testing.assert_close(dst(x), ema(x), rtol=0, atol=0)


def test_plain_and_ddp_prefixed_state_dicts_load(tmp_path):
    src = _model(seed=0)
    torch.save(src.state_dict(), tmp_path / "plain.pth")
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "ddp.pth")
    x = torch.randn(1, 3, 24, 24)
    for name in ("plain.pth", "ddp.pth"):
        dst = _model(seed=3)
        load_checkpoint(dst, tmp_path / name)
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_missing_truncated_and_foreign_files_fail_naming_the_file(tmp_path):
    model = _model()
    with pytest.raises(CheckpointError, match="not found.*nope.pth"):
        load_checkpoint(model, tmp_path / "nope.pth")
    torch.save({"model": model.state_dict()}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth.*truncated"):
        load_checkpoint(model, tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="text.pth"):
        load_checkpoint(model, tmp_path / "text.pth")
    torch.save({"model": torch.nn.Linear(3, 4).state_dict()}, tmp_path / "linear.pth")
    with pytest.raises(CheckpointError, match="linear.pth.*no parameter names"):
        load_checkpoint(model, tmp_path / "linear.pth")


def test_other_width_or_depth_is_an_error(tmp_path):
    torch.save({"model": _model(dims=24).state_dict()}, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="wide.pth.*shape mismatch"):
        load_checkpoint(_model(dims=16), tmp_path / "wide.pth")
    deeper = SpatialMamba(dims=16, depths=(1, 1, 2, 1), num_classes=7)
    torch.save({"model": deeper.state_dict()}, tmp_path / "deeper.pth")
    with pytest.raises(CheckpointError, match="deeper.pth.*unexpected keys"):
        load_checkpoint(_model(dims=16), tmp_path / "deeper.pth")
    result = load_checkpoint(_model(dims=16), tmp_path / "deeper.pth", strict=False)
    assert result.unexpected_keys and all(k.startswith("layers.2.blocks.1.") for k in result.unexpected_keys)


def test_untrusted_objects_are_refused_by_default(tmp_path):
    import argparse

    torch.save({"model": _model().state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "args.pth")
    with pytest.raises(CheckpointError, match="trusted=True"):
        load_file(tmp_path / "args.pth")
    assert load_file(tmp_path / "args.pth", trusted=True)["args"].lr == 1
