"""The config tree: official defaults, variant files, BASE inheritance, --opts and flag overrides, bad keys."""

from __future__ import annotations

import argparse

import pytest
import yaml

from classification.config import UsageError, default_config, get_config, load_config
from classification.main import parse_option, scaled_config

from .conftest import ROOT

VARIANTS = ROOT / "classification" / "configs" / "spatialmamba"


def args_for(*argv) -> argparse.Namespace:
    return parse_option(list(argv))


def test_defaults_are_the_official_ones():
    c = default_config()
    assert (c.DATA.BATCH_SIZE, c.DATA.IMG_SIZE, c.DATA.INTERPOLATION) == (128, 224, "bicubic")
    assert (c.TRAIN.EPOCHS, c.TRAIN.WARMUP_EPOCHS, c.TRAIN.WEIGHT_DECAY) == (300, 20, 0.05)
    assert (c.TRAIN.BASE_LR, c.TRAIN.WARMUP_LR, c.TRAIN.MIN_LR, c.TRAIN.CLIP_GRAD) == (5e-4, 5e-7, 5e-6, 5.0)
    assert c.TRAIN.LR_SCHEDULER.NAME == "cosine" and c.TRAIN.OPTIMIZER.NAME == "adamw"
    assert tuple(c.TRAIN.OPTIMIZER.BETAS) == (0.9, 0.999) and c.TRAIN.OPTIMIZER.EPS == 1e-8
    assert (c.AUG.MIXUP, c.AUG.CUTMIX, c.AUG.REPROB, c.AUG.AUTO_AUGMENT) == (0.8, 1.0, 0.25, "rand-m9-mstd0.5-inc1")
    assert (c.MODEL.LABEL_SMOOTHING, c.TRAIN.MESA, c.MODEL_EMA_DECAY, c.AMP_ENABLE) == (0.1, -1.0, 0.9999, True)
    # The official default of 16 cannot run (docs/official_bugs.md, #4); 1 is what every official YAML sets.
    assert c.MODEL.SPATIALMAMBA.D_STATE == 1


@pytest.mark.parametrize(
    "variant, embed_dim, depths, drop_path, mesa",
    [
        ("tiny", 64, [2, 4, 8, 4], 0.2, 1.0),
        ("small", 64, [2, 4, 21, 5], 0.3, 1.5),
        ("base", 96, [2, 4, 21, 5], 0.5, 2.0),
    ],
)
def test_variant_files_give_the_official_models(variant, embed_dim, depths, drop_path, mesa):
    c = load_config(VARIANTS / f"spatialmamba_{variant}.yaml")
    assert c.MODEL.SPATIALMAMBA.EMBED_DIM == embed_dim and list(c.MODEL.SPATIALMAMBA.DEPTHS) == depths
    assert c.MODEL.DROP_PATH_RATE == drop_path and c.TRAIN.MESA == mesa
    # The official names: run folders are OUTPUT/<tiny|small|base>/TAG, so official run folders resume.
    assert c.MODEL.NAME == variant
    assert (c.MODEL.SPATIALMAMBA.D_STATE, c.TRAIN.EPOCHS, c.TRAIN.WARMUP_EPOCHS) == (1, 300, 20)


@pytest.mark.parametrize("name", ["spatialmamba_tiny", "spatialmamba_small", "spatialmamba_base"])
def test_variant_files_say_only_what_differs_from_the_defaults(name):
    defaults = default_config()

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    for key, value in leaves(yaml.safe_load((VARIANTS / f"{name}.yaml").read_text())):
        node = defaults
        for part in key.split("."):
            node = node[part]
        assert node != value, f"{name}.yaml repeats the default {key}={value!r}"


def test_base_files_are_merged_first_then_the_file_then_opts(tmp_path):
    (tmp_path / "parent.yaml").write_text("TRAIN:\n  EPOCHS: 100\n  BASE_LR: 0.001\nDATA:\n  IMG_SIZE: 192\n")
    (tmp_path / "child.yaml").write_text("BASE: ['parent.yaml']\nTRAIN:\n  EPOCHS: 50\n")
    c = load_config(tmp_path / "child.yaml", ["DATA.IMG_SIZE", "256", "TRAIN.WEIGHT_DECAY", "0"])
    assert c.TRAIN.EPOCHS == 50  # the child wins over its BASE
    assert c.TRAIN.BASE_LR == 0.001  # inherited
    assert c.DATA.IMG_SIZE == 256  # --opts win over both
    assert c.TRAIN.WEIGHT_DECAY == 0.0 and isinstance(c.TRAIN.WEIGHT_DECAY, float)  # int coerced to the float key


def test_flags_override_opts_and_output_is_joined_with_name_and_tag():
    cfg = VARIANTS / "spatialmamba_small.yaml"
    args = args_for(
        "--cfg", str(cfg), "--opts", "DATA.BATCH_SIZE", "64", "--batch-size", "32", "--output", "/runs",
        "--tag", "exp1", "--disable_amp", "--accumulation-steps", "2", "--model_ema_decay", "0.99", "--use-checkpoint",
    )  # fmt: skip
    c = get_config(args)
    assert c.DATA.BATCH_SIZE == 32
    assert c.OUTPUT == "/runs/small/exp1"  # the official run folder OUTPUT/MODEL.NAME/TAG
    assert c.AMP_ENABLE is False and c.TRAIN.ACCUMULATION_STEPS == 2 and c.TRAIN.USE_CHECKPOINT is True
    assert c.MODEL_EMA_DECAY == 0.99 and c.MODEL_EMA is True


def test_lr_is_scaled_by_total_batch_over_512():
    # The README's launch: 8 processes x 128 = 1024 -> lr 1e-3, warm-up 1e-6, min 1e-5 (official main.py).
    args = args_for("--cfg", str(VARIANTS / "spatialmamba_tiny.yaml"), "--tag", "t")
    c = scaled_config(get_config(args), world_size=8)
    assert c.TRAIN.BASE_LR == pytest.approx(1e-3)
    assert c.TRAIN.WARMUP_LR == pytest.approx(1e-6)
    assert c.TRAIN.MIN_LR == pytest.approx(1e-5)
    args = args_for("--cfg", str(VARIANTS / "spatialmamba_tiny.yaml"), "--tag", "t", "--accumulation-steps", "2")
    assert scaled_config(get_config(args), world_size=4).TRAIN.BASE_LR == pytest.approx(1e-3)


def test_unknown_key_in_a_config_file_names_the_key_and_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("TRAIN:\n  EPOCHZ: 3\n")
    with pytest.raises(UsageError, match=r"'TRAIN.EPOCHZ'.*did you mean EPOCHS") as err:
        load_config(bad)
    assert str(bad) in str(err.value)


def test_unknown_or_mistyped_opts_name_the_key():
    with pytest.raises(UsageError, match=r"--opts: unknown config key 'TRAIN.BASELR'"):
        load_config(None, ["TRAIN.BASELR", "0.1"])
    with pytest.raises(UsageError, match=r"DATA.BATCH_SIZE must be a int.*'big'"):
        load_config(None, ["DATA.BATCH_SIZE", "big"])
    with pytest.raises(UsageError, match="odd number"):
        load_config(None, ["DATA.BATCH_SIZE"])


def test_missing_or_invalid_config_file_is_named(tmp_path):
    with pytest.raises(UsageError, match="config file not found.*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("TRAIN: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_config(broken)


def test_values_the_trainer_cannot_run_with_are_rejected():
    cfg = str(VARIANTS / "spatialmamba_tiny.yaml")
    with pytest.raises(UsageError, match="BATCH_SIZE.*must be even when Mixup/CutMix is on, got 3"):
        get_config(args_for("--cfg", cfg, "--batch-size", "3", "--tag", "t"))
    with pytest.raises(UsageError, match="TRAIN.MESA=1.0 distils from the EMA"):
        get_config(args_for("--cfg", cfg, "--model_ema", "False", "--tag", "t"))
    with pytest.raises(UsageError, match="MODEL.TYPE must be 'spatial_mamba', got 'vmamba'"):
        get_config(args_for("--cfg", cfg, "--opts", "MODEL.TYPE", "vmamba", "--tag", "t"))


def test_digits_demo_config_loads_and_passes_the_checks():
    c = get_config(args_for("--cfg", str(ROOT / "configs" / "digits_demo.yaml"), "--tag", "t"))
    assert c.MODEL.NUM_CLASSES == 10 and c.DATA.IMG_SIZE == 32
