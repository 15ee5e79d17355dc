"""Bad input stops main.py before training, with a message naming the value, and overwrites nothing."""

from __future__ import annotations

import os

import pytest
import torch

from classification.main import main

from .conftest import write_image_folder
from .test_checkpoint import tiny_model


@pytest.fixture
def run(image_folder, tiny_cfg, tmp_path, capsys):
    """Calls main() in this process (what one process without a launcher does); returns (exit code, stderr)."""

    def call(*extra, cfg=tiny_cfg, data=image_folder, tag="bad"):
        code = main(["--cfg", str(cfg), "--data-path", str(data), "--output", str(tmp_path), "--tag", tag, *extra])
        return code, capsys.readouterr().err

    return call


def test_missing_data_path(run, tmp_path):
    code, err = run(data=tmp_path / "no_such_folder")
    assert code == 2 and f"error: data path '{tmp_path / 'no_such_folder'}'" in err and "does not exist" in err


def test_empty_data_path(run, tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    code, err = run(data=tmp_path / "empty")
    assert code == 2 and f"'{tmp_path / 'empty' / 'train'}' is empty" in err


def test_val_classes_differ_from_train(run, tmp_path):
    classes = {"train": ["a", "b", "c", "d"], "val": ["a", "b", "c", "x"]}
    data = write_image_folder(tmp_path / "mismatch", classes, train_per_class=2, val_per_class=1)
    code, err = run(data=data)
    assert code == 2 and "only in train ['d']" in err and "only in val ['x']" in err


def test_unknown_key_in_cfg_file(run, tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("MODEL:\n  DROP_PATH: 0.2\n")
    code, err = run(cfg=cfg)
    assert code == 2 and "unknown config key 'MODEL.DROP_PATH'" in err and str(cfg) in err


def test_unknown_opts_key(run):
    code, err = run("--opts", "TRAIN.WARMUP", "5")
    assert code == 2 and "--opts: unknown config key 'TRAIN.WARMUP'; did you mean" in err and "WARMUP_EPOCHS" in err


def test_checkpoint_of_another_width_for_eval(run, tmp_path):
    path = tmp_path / "wide.pth"
    torch.save({"model": tiny_model(embed_dim=16).state_dict()}, path)
    code, err = run("--pretrained", str(path), "--eval")
    assert code == 2 and str(path) in err and "EMBED_DIM 16 in the checkpoint vs 8 in the config" in err


def test_eval_without_weights(run):
    code, err = run("--eval")
    assert code == 2 and "--eval needs weights to evaluate" in err


def test_a_failed_start_overwrites_nothing_in_the_output_folder(run, tmp_path):
    """A run folder from an earlier, wider model: auto-resume finds its latest_ckpt.pth, refuses it, and every file
    that was there keeps its bytes (the log only gets the error appended)."""
    run_dir = tmp_path / "tiny_test" / "earlier"
    run_dir.mkdir(parents=True)
    torch.save({"model": tiny_model(embed_dim=16).state_dict(), "epoch": 3}, run_dir / "latest_ckpt.pth")
    (run_dir / "config.json").write_text("the earlier run's config\n")
    (run_dir / "metrics.jsonl").write_text('{"epoch": 3}\n')
    before = {p.name: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in run_dir.iterdir()}
    code, err = run(tag="earlier")
    assert code == 2 and "latest_ckpt.pth" in err and "EMBED_DIM 16 in the checkpoint vs 8" in err
    after = {p.name: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in run_dir.iterdir() if p.name in before}
    assert after == before
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([*before, "log_rank0.txt"])
    assert "EMBED_DIM 16 in the checkpoint" in (run_dir / "log_rank0.txt").read_text()
