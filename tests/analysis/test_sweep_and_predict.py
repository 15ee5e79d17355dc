"""tools/resolution_sweep.py and tools/predict.py on a digits ImageFolder and a narrow trainer checkpoint: the
accuracies and probabilities they report against ones computed here, the class names, and their one-line errors."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

import spatial_mamba
from classification.config import load_config
from tests.classification.conftest import write_image_folder

ROOT = Path(__file__).resolve().parents[2]
# Class folders renamed from 0..9 to words, so that names and indices differ and sorted order is not digit order.
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CLASSES = sorted(WORDS)
VAL_IMAGES = 360  # 20% of scikit-learn's 1,797 digits, stratified
NARROW_CFG = """
DATA:
  IMG_SIZE: 48
  BATCH_SIZE: 64
  NUM_WORKERS: 0
MODEL:
  NAME: digits_narrow
  NUM_CLASSES: {classes}
  SPATIALMAMBA:
    EMBED_DIM: 8
    DEPTHS: [1, 1, 1, 1]
"""


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _eval_transform(size):
    """The trainer's evaluation preprocessing, written out: resize the short side to size·256/224, centre crop."""
    return transforms.Compose(
        [
            transforms.Resize(int(size * 256 / 224), InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
    )


def _narrow_model(classes):
    return spatial_mamba.SpatialMamba(depths=[1, 1, 1, 1], dims=8, num_classes=classes).eval()


def _official_file(path, model, cfg):
    """The trainer's checkpoint layout (classification/checkpoint.py save_checkpoint), with a stand-in optimizer."""
    optimizer = torch.optim.AdamW(model.parameters())
    config = load_config(str(cfg))
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": {}}
    state.update(max_accuracy=0.0, scaler={}, epoch=0, config=config, steps=0, model_ema=model.state_dict())
    torch.save(state, path)
    return str(path)


@torch.no_grad()
def _logits(model, folder, size):
    dataset = datasets.ImageFolder(str(folder), transform=_eval_transform(size))
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=64))
    return torch.cat([model(x) for x, _ in batches]), torch.cat([y for _, y in batches])


def _accuracy(model, folder, size, k):
    logits, labels = _logits(model, folder, size)
    return 100.0 * logits.topk(k, dim=1).indices.eq(labels[:, None]).any(1).double().mean().item()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    make_digits = _tool("make_digits_imagefolder")
    root = tmp_path_factory.mktemp("digits") / "data"
    make_digits.write_digits(str(root), size=16)
    for split in ("train", "val"):
        for digit, word in enumerate(WORDS):
            (root / split / str(digit)).rename(root / split / word)
    return root


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """A narrow model whose head is fitted by least squares on the train split's pooled features at 48 px (no
    gradient steps): well above chance, so a tool that dropped the checkpoint's weights would show it."""
    folder = tmp_path_factory.mktemp("run")
    cfg = folder / "digits_narrow.yaml"
    cfg.write_text(NARROW_CFG.format(classes=10))
    torch.manual_seed(0)
    model = _narrow_model(10)
    dataset = datasets.ImageFolder(str(digits / "train"), transform=_eval_transform(48))
    with torch.no_grad():
        x, y = map(torch.cat, zip(*torch.utils.data.DataLoader(dataset, batch_size=256)))
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        design = torch.cat([features, torch.ones(len(features), 1)], 1).double()
        solution = torch.linalg.lstsq(design, torch.eye(10, dtype=torch.float64)[y]).solution
        model.head.weight.copy_(solution[:-1].T)
        model.head.bias.copy_(solution[-1])
    return model, _official_file(folder / "best_ckpt.pth", model, cfg), str(cfg)


def test_sweep_reports_the_checkpoints_accuracy_on_the_val_split_at_each_size(tmp_path, digits, trained, capsys):
    model, checkpoint, cfg = trained
    out = tmp_path / "out"
    argv = ["--cfg", cfg, "--checkpoint", checkpoint, "--data-path", str(digits), "--sizes", "48", "40"]
    _tool("resolution_sweep").main([*argv, "--out", str(out)])
    summary = json.loads((out / "resolution_sweep.json").read_text())
    assert summary["checkpoint"] == checkpoint and summary["config"] == cfg and summary["num_classes"] == 10
    assert len(list((digits / "val").rglob("*.png"))) == VAL_IMAGES
    assert [r["size"] for r in summary["results"]] == [48, 40]
    printed = capsys.readouterr().out.splitlines()
    for result in summary["results"]:
        size = result["size"]
        assert result["num_images"] == VAL_IMAGES and result["input_size"] == [size, size]
        assert 0 <= result["top1"] <= result["top5"] <= 100
        assert result["top1"] == pytest.approx(_accuracy(model, digits / "val", size, 1), abs=1e-9)
        assert result["top5"] == pytest.approx(_accuracy(model, digits / "val", size, 5), abs=1e-9)
        assert f"size {size}: top-1 {result['top1']:6.2f}%, top-5 {result['top5']:6.2f}% on 360 images" in printed
    assert summary["results"][0]["top1"] > 30  # the fitted head (chance is 10%)
    assert Image.open(out / "resolution_sweep.png").size[0] > 300


def test_sweep_leaves_top5_out_below_five_classes_and_says_when_images_are_not_resized(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data")  # 4 classes of 32 px images
    cfg = tmp_path / "four.yaml"
    cfg.write_text(NARROW_CFG.format(classes=4))
    checkpoint = _official_file(tmp_path / "ckpt.pth", _narrow_model(4), cfg)
    argv = ["--cfg", str(cfg), "--checkpoint", checkpoint, "--data-path", str(data), "--sizes", "24", "40"]
    _tool("resolution_sweep").main([*argv, "--batch-size", "5", "--out", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "resolution_sweep.json").read_text())["results"]
    assert [r["top5"] for r in results] == [None, None] and [r["num_images"] for r in results] == [16, 16]
    assert [r["input_size"] for r in results] == [[32, 32], [40, 40]]  # the trainer does not resize at <= 32 px
    printed = capsys.readouterr().out
    assert re.search(r"^size 24: top-1 +[\d.]+% on 16 images \(not resized: 32x32 input\)$", printed, re.M)
    assert re.search(r"^size 40: top-1 +[\d.]+% on 16 images$", printed, re.M)


def test_sweep_names_a_missing_file_folder_split_or_bad_size(tmp_path, digits, trained):
    _, checkpoint, cfg = trained
    sweep = _tool("resolution_sweep")
    (tmp_path / "no_val" / "train" / "a").mkdir(parents=True)

    def run(**changes):
        flags = dict(
            cfg=[cfg], checkpoint=[checkpoint], data_path=[str(digits)], sizes=["40"], out=[str(tmp_path / "out")]
        )
        flags.update(changes)
        sweep.main([part for key, values in flags.items() for part in (f"--{key.replace('_', '-')}", *values)])

    with pytest.raises(SystemExit, match=r"^config file not found: '.*nope\.yaml'$"):
        run(cfg=[str(tmp_path / "nope.yaml")])
    with pytest.raises(SystemExit, match=r"^checkpoint file not found: '.*nope\.pth'$"):
        run(checkpoint=[str(tmp_path / "nope.pth")])
    with pytest.raises(SystemExit, match=r"^data folder not found: '.*missing'$"):
        run(data_path=[str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match=r"^data folder '.*no_val' has no val split: '.*no_val/val' does not exist$"):
        run(data_path=[str(tmp_path / "no_val")])
    for size in ("0", "-3"):
        with pytest.raises(SystemExit, match=rf"^--sizes must be positive input sizes in pixels, got {size}$"):
            run(sizes=["40", size])
    with pytest.raises(SystemExit, match=r"^checkpoint '.*best_ckpt\.pth' is from another architecture or width"):
        run(opts=["MODEL.SPATIALMAMBA.EMBED_DIM", "16"])
    assert not (tmp_path / "out").exists()


def _printed_predictions(text, images, k):
    """{image: [(probability, index, name or None)]} from predict's output: a line per image, then k lines."""
    lines = [line for line in text.splitlines() if not line.startswith("wrote ")]
    assert len(lines) == len(images) * (k + 1)
    result = {}
    for i, image in enumerate(images):
        block = lines[i * (k + 1) : (i + 1) * (k + 1)]
        assert block[0] == image
        rows = [re.fullmatch(r"  (\d\.\d{4})  +(\d+)(?:  (.+))?", line) for line in block[1:]]
        assert all(rows), block
        result[image] = [(float(m[1]), int(m[2]), m[3]) for m in rows]
    return result


def test_predict_names_the_image_folder_classes_of_a_trainer_checkpoint(tmp_path, digits, trained, capsys):
    model, checkpoint, cfg = trained
    images = [str(sorted((digits / "val" / word).iterdir())[0]) for word in ("three", "eight")]
    predict = _tool("predict")
    argv = [*images, "--cfg", cfg, "--checkpoint", checkpoint, "--topk", "3"]
    predict.main([*argv, "--classes", str(digits), "--json", str(tmp_path / "p.json")])
    printed = _printed_predictions(capsys.readouterr().out, images, 3)
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["classes"] == str(digits) and [p["image"] for p in saved["predictions"]] == images
    transform = _eval_transform(48)
    for image, prediction in zip(images, saved["predictions"]):
        with torch.no_grad(), Image.open(image) as picture:
            expected = model(transform(picture.convert("RGB"))[None]).softmax(-1)[0]
        top = prediction["topk"]
        assert [p["index"] for p in top] == expected.topk(3).indices.tolist()
        assert [p["probability"] for p in top] == pytest.approx(expected.topk(3).values.tolist(), abs=1e-6)
        assert [p["name"] for p in top] == [CLASSES[p["index"]] for p in top]
        assert printed[image] == [(round(p["probability"], 4), p["index"], p["name"]) for p in top]
        probabilities = [p["probability"] for p in top]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
    # The val split names the same classes; without --classes only the indices are printed.
    predict.main([*argv, "--classes", str(digits / "val")])
    assert _printed_predictions(capsys.readouterr().out, images, 3) == printed
    predict.main(argv)
    bare = _printed_predictions(capsys.readouterr().out, images, 3)
    assert bare == {image: [(p, i, None) for p, i, _ in rows] for image, rows in printed.items()}


def test_predict_prints_imagenet_names_for_a_1000_class_model(tmp_path, capsys):
    image = tmp_path / "noise.png"
    Image.fromarray(torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8).numpy()).save(image)
    _tool("predict").main(
        [str(image), "--model", "spatial_mamba_tiny", "--img-size", "64", "--json", str(tmp_path / "p.json")]
    )
    printed = _printed_predictions(capsys.readouterr().out, [str(image)], 5)[str(image)]
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["classes"] == "imagenet-1k"
    top = saved["predictions"][0]["topk"]
    info = ImageNetInfo()
    assert [name for _, _, name in printed] == [info.index_to_description(p["index"]) for p in top]
    assert all(isinstance(p["name"], str) and not p["name"].isdigit() for p in top)
    assert info.index_to_description(0) == "tench, Tinca tinca"  # the names are timm's descriptions, not synsets
    probabilities = [p["probability"] for p in top]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6


def test_predict_names_a_missing_image_checkpoint_or_classes_folder_and_a_class_count_mismatch(
    tmp_path, digits, trained
):
    _, checkpoint, cfg = trained
    predict = _tool("predict")
    image = str(sorted((digits / "val" / "one").iterdir())[0])
    base = ["--cfg", cfg, "--checkpoint", checkpoint]
    with pytest.raises(SystemExit, match=r"^image file not found: '.*nope\.png'$"):
        predict.main([image, str(tmp_path / "nope.png"), *base])
    with pytest.raises(SystemExit, match=r"^checkpoint file not found: '.*nope\.pth'$"):
        predict.main([image, "--cfg", cfg, "--checkpoint", str(tmp_path / "nope.pth")])
    with pytest.raises(SystemExit, match=r"^classes folder not found: '.*missing'$"):
        predict.main([image, *base, "--classes", str(tmp_path / "missing")])
    four = write_image_folder(tmp_path / "four")
    with pytest.raises(SystemExit, match=r"^classes folder '.*four/train' has 4 classes but the model's head has 10"):
        predict.main([image, *base, "--classes", str(four)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^classes folder '.*empty' has no class subfolders$"):
        predict.main([image, *base, "--classes", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match=r"^--topk must be positive, got 0$"):
        predict.main([image, *base, "--topk", "0"])
