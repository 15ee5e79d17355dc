"""Atomic checkpoint writes, the official layout and its misspelled key, and clear errors for foreign weights."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from yacs.config import CfgNode

from classification import checkpoint as ckpt
from classification.config import load_config
from classification.models import build_model
from spatial_mamba import compat
from spatial_mamba.checkpoint import CheckpointError


def tiny_model(embed_dim=8, depths="[1, 1, 1, 1]", num_classes=4):
    return build_model(
        load_config(
            None,
            [
                "MODEL.SPATIALMAMBA.EMBED_DIM",
                str(embed_dim),
                "MODEL.SPATIALMAMBA.DEPTHS",
                depths,
                "MODEL.NUM_CLASSES",
                str(num_classes),
            ],
        )  # fmt: skip
    )


def test_a_failed_save_leaves_the_previous_file_intact_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "latest_ckpt.pth"
    ckpt.atomic_save({"epoch": 1}, str(path))
    before = path.read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt  # what a Ctrl-C or an out-of-disk error in the middle of torch.save looks like

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"epoch": 2}, str(path))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["latest_ckpt.pth"]


def test_saved_checkpoints_get_the_usual_file_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        ckpt.atomic_save({"epoch": 0}, str(tmp_path / "a.pth"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "a.pth").st_mode) == 0o644


def test_official_layout_file_loads_and_its_misspelled_ema_key_is_read(tmp_path):
    model = tiny_model()
    official = {
        "model": model.state_dict(),
        "model_ema": model.state_dict(),
        "optimizer": {},
        "lr_scheduler": {},
        "max_accuracy": 81.5,
        "scaler": {},
        "epoch": 7,
        "config": CfgNode({"MODEL": CfgNode({"NAME": "spatialmamba_tiny"})}),
        "steps": 0,
        "max_accuray_ema": 82.25,  # the official spelling; the correct one is absent
    }
    path = tmp_path / "official.pth"
    torch.save(official, path)
    loaded = ckpt.read_checkpoint(str(path), tiny_model(), tiny_model())
    assert ckpt.best_ema_accuracy(loaded) == 82.25
    assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())


def test_our_checkpoints_write_both_spellings_of_the_best_ema_accuracy(tmp_path):
    model, ema = tiny_model(), tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    scaler = compat.grad_scaler("cpu", enabled=False)
    config = load_config()
    path = str(tmp_path / ckpt.LATEST)
    ckpt.save_checkpoint(path, config, 3, model, optimizer, scheduler, scaler, 70.0, ema, 71.0)
    saved = torch.load(path, weights_only=False)
    assert {"model", "model_ema", "optimizer", "lr_scheduler", "scaler", "epoch", "config", "max_accuracy"} <= set(
        saved
    )
    assert saved["max_accuray_ema"] == saved["max_accuracy_ema"] == 71.0
    assert isinstance(saved["config"], CfgNode) and saved["epoch"] == 3


@pytest.mark.parametrize(
    "other, expected",
    [
        (dict(embed_dim=16), r"EMBED_DIM 16 in the checkpoint vs 8 in the config"),
        (dict(depths="[1, 2, 1, 1]"), r"DEPTHS \[1, 2, 1, 1\] in the checkpoint vs \[1, 1, 1, 1\] in the config"),
        (dict(num_classes=10), r"NUM_CLASSES 10 in the checkpoint vs 4 in the config"),
    ],
)
def test_weights_of_another_architecture_are_refused_naming_what_differs(tmp_path, other, expected):
    path = tmp_path / "other.pth"
    torch.save({"model": tiny_model(**other).state_dict()}, path)
    with pytest.raises(CheckpointError, match=expected) as err:
        ckpt.read_checkpoint(str(path), tiny_model(), None)
    assert str(path) in str(err.value)


def test_a_checkpoint_of_another_network_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, path)
    with pytest.raises(CheckpointError, match="not a Spatial-Mamba classifier"):
        ckpt.read_checkpoint(str(path), tiny_model(), None)


def test_auto_resume_prefers_latest_ckpt_over_newer_files(tmp_path):
    assert ckpt.find_resume_file(str(tmp_path)) is None
    for name in (ckpt.LATEST, ckpt.BEST):  # best_ckpt.pth is written after latest here
        ckpt.atomic_save({"epoch": 0}, str(tmp_path / name))
    assert ckpt.find_resume_file(str(tmp_path)) == str(tmp_path / ckpt.LATEST)
    os.remove(tmp_path / ckpt.LATEST)
    assert ckpt.find_resume_file(str(tmp_path)) == str(tmp_path / ckpt.BEST)
