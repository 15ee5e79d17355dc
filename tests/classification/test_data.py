"""Data-folder checks, transforms, the val shard sampler, zip mode and the digits writer of the main job."""

from __future__ import annotations

import importlib.util
import shutil
import zipfile

import pytest
import torch
from PIL import Image
from torchvision import transforms

from classification.config import UsageError, load_config
from classification.data import ShardSampler, ZipImageDataset, build_transform, check_data_path

from .conftest import ROOT, write_image_folder


def config_for(path, *opts):
    return load_config(None, ["DATA.DATA_PATH", str(path), "MODEL.NUM_CLASSES", "4", *opts])


def test_a_missing_or_incomplete_data_path_is_named(tmp_path):
    with pytest.raises(UsageError, match=f"data path '{tmp_path / 'nope'}'.*does not exist"):
        check_data_path(config_for(tmp_path / "nope"))
    (tmp_path / "train").mkdir()
    with pytest.raises(UsageError, match=f"'{tmp_path / 'train'}' is empty"):
        check_data_path(config_for(tmp_path))
    with pytest.raises(UsageError, match="no data folder: pass --data-path"):
        check_data_path(config_for(""))


def test_val_classes_that_differ_from_train_are_listed(tmp_path):
    classes = {"train": ["cat", "dog", "emu", "fox"], "val": ["cat", "dog", "emu", "gnu"]}
    write_image_folder(tmp_path, classes, train_per_class=1, val_per_class=1)
    with pytest.raises(UsageError, match=r"differ.*1 only in train \['fox'\], 1 only in val \['gnu'\]"):
        check_data_path(config_for(tmp_path))


def test_more_classes_than_the_classifier_has_is_refused(tmp_path):
    write_image_folder(tmp_path, train_per_class=1, val_per_class=1)
    assert check_data_path(config_for(tmp_path)) == 4
    with pytest.raises(UsageError, match="has 4 classes but MODEL.NUM_CLASSES is 3.*MODEL.NUM_CLASSES 4"):
        check_data_path(load_config(None, ["DATA.DATA_PATH", str(tmp_path), "MODEL.NUM_CLASSES", "3"]))


def test_transforms_are_the_official_ones():
    train = build_transform(True, load_config())
    names = [type(t).__name__ for t in train.transforms]
    assert names[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment"]
    assert names[-1] == "RandomErasing"
    test = build_transform(False, load_config()).transforms
    assert isinstance(test[0], transforms.Resize) and test[0].size == 256
    assert isinstance(test[1], transforms.CenterCrop) and test[1].size == (224, 224)
    small = build_transform(True, load_config(None, ["DATA.IMG_SIZE", "32"])).transforms[0]
    assert isinstance(small, transforms.RandomCrop) and small.padding == 4  # no resizing of 32 px images


@pytest.mark.parametrize("size, world", [(10, 3), (16, 2), (2, 4)])
def test_val_shards_cover_every_image_exactly_once(size, world):
    seen = sorted(i for rank in range(world) for i in ShardSampler(size, rank, world))
    assert seen == list(range(size))


def test_zip_mode_reads_swin_layout(tmp_path):
    write_image_folder(tmp_path / "tree", train_per_class=2, val_per_class=1)
    for split in ("train", "val"):
        lines = []
        with zipfile.ZipFile(tmp_path / f"{split}.zip", "w") as zf:
            for k in range(4):
                for image in sorted((tmp_path / "tree" / split / f"class{k}").iterdir()):
                    member = f"class{k}/{image.name}"
                    zf.write(image, member)
                    lines.append(f"{member}\t{k}")
        (tmp_path / f"{split}_map.txt").write_text("\n".join(lines) + "\n")
    config = config_for(tmp_path, "DATA.ZIP_MODE", "True", "DATA.IMG_SIZE", "32")
    assert check_data_path(config) == 4
    dataset = ZipImageDataset(str(tmp_path), "train", build_transform(False, config), cache_indices=range(0, 8, 2))
    image, label = dataset[3]
    assert image.shape == (3, 32, 32) and label == 1
    assert set(dataset.cache) == {0, 2, 4, 6}
    original = Image.open(tmp_path / "tree" / "train" / "class1" / "1.png").convert("RGB")
    expected = build_transform(False, config)(original)
    assert torch.equal(image, expected)


def test_digits_writer_makes_a_stratified_imagefolder(tmp_path):
    spec = importlib.util.spec_from_file_location("make_digits", ROOT / "tools" / "make_digits_imagefolder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "digits"
    info = module.write_digits(str(out), size=16)
    assert (info["train"], info["val"], info["classes"]) == (1437, 360, 10)
    counts = {d.name: len(list(d.iterdir())) for d in (out / "val").iterdir()}
    assert sorted(counts) == [str(k) for k in range(10)] and min(counts.values()) >= 35
    assert check_data_path(load_config(None, ["DATA.DATA_PATH", str(out), "MODEL.NUM_CLASSES", "10"])) == 10
    shutil.rmtree(out / "val" / "3")  # a second call with the same arguments keeps what is there
    module.write_digits(str(out), size=16)
    assert not (out / "val" / "3").exists()
