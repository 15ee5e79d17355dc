"""tools/mixing_matrix.py and tools/erf.py: what they write on small inputs, and their one-line errors."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import spatial_mamba  # noqa: F401  (registers the models with timm)
from spatial_mamba.analysis import capture_mixer, image_transform

ROOT = Path(__file__).resolve().parents[2]


def _tool(name):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def _image(path, seed=0, size=(60, 80)):
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An official-layout trainer checkpoint (key "model") of spatial_mamba_tiny with a 10-class head."""
    torch.manual_seed(3)
    model = timm.create_model("spatial_mamba_tiny", num_classes=10).eval()
    path = tmp_path_factory.mktemp("ckpt") / "best_ckpt.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    return model, str(path)


def test_mixing_matrix_tool_writes_figures_and_the_matrices_of_the_checkpoint(tmp_path, tiny_checkpoint, capsys):
    source, checkpoint = tiny_checkpoint
    image = _image(tmp_path / "image.png")
    out = tmp_path / "out"
    _tool("mixing_matrix").main(
        [
            "--model",
            "spatial_mamba_tiny",
            "--checkpoint",
            checkpoint,
            "--image",
            image,
            "--img-size",
            "64",
            "--stage",
            "1",
            "--query",
            "0",
            "7",
            "--query",
            "5",
            "2",
            "--out",
            str(out),
        ]
    )
    for name in ("matrices.png", "queries.png"):
        assert Image.open(out / name).size[0] > 300
    result = torch.load(out / "mixing_matrix.pt")
    assert result["grid"] == (8, 8) and result["queries"] == [(0, 7), (5, 2)]
    assert result["spatial_mamba"].shape == result["mamba"].shape == (64, 64)
    assert torch.equal(torch.triu(result["mamba"], 1), torch.zeros(64, 64))
    assert torch.triu(result["spatial_mamba"], 1).sum() > 0
    torch.testing.assert_close(result["mamba_rows"], result["mamba"][[7, 42]])
    assert result["relative_error"] < 1e-5
    # The mixer input is the checkpoint model's, so the weights were loaded.
    transform, _, _ = image_transform(source, 64)
    with Image.open(image) as picture:
        expected = capture_mixer(source, transform(picture.convert("RGB"))[None], 1, 0).x
    torch.testing.assert_close(result["x"], expected)
    assert "M·u vs the mixer's own output" in capsys.readouterr().out


def test_mixing_matrix_tool_names_a_missing_image_checkpoint_or_bad_stage(tmp_path):
    tool = _tool("mixing_matrix")
    image = _image(tmp_path / "image.png")
    base = ["--model", "spatial_mamba_tiny", "--img-size", "64", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"^image file not found: '.*nope\.png'$"):
        tool.main([*base, "--image", str(tmp_path / "nope.png")])
    with pytest.raises(SystemExit, match=r"^checkpoint file not found: '.*none\.pth'$"):
        tool.main([*base, "--image", image, "--checkpoint", str(tmp_path / "none.pth")])
    with pytest.raises(SystemExit, match=r"^stage must be in \[0, 4\), got 5$"):
        tool.main([*base, "--image", image, "--stage", "5"])
    assert not (tmp_path / "out").exists()


def test_erf_tool_compares_models_on_a_folder_of_images(tmp_path, tiny_checkpoint, capsys):
    _, checkpoint = tiny_checkpoint
    data = tmp_path / "data"
    (data / "class_a").mkdir(parents=True)
    for seed in range(3):
        _image(data / "class_a" / f"{seed}.png", seed)
    out = tmp_path / "out"
    _tool("erf").main(
        [
            "--models",
            "spatial_mamba_tiny",
            "resnet18",
            "--checkpoint",
            checkpoint,
            "-",
            "--data",
            str(data),
            "--num-images",
            "2",
            "--img-size",
            "64",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert f"averaging over 2 images from {data}" in printed
    summary = json.loads((out / "erf.json").read_text())
    assert summary["num_images"] == 2 and summary["data"] == str(data)
    labels = ["spatial_mamba_tiny (best_ckpt.pth)", "resnet18"]
    assert list(summary["models"]) == labels
    for label in labels:
        areas = [summary["models"][label]["area_fraction"][f] for f in ("0.2", "0.3", "0.5", "0.99")]
        assert 0 < areas[0] <= areas[1] <= areas[2] <= areas[3] <= 1
        assert f"{label}: image area holding 20%" in printed
    fields = torch.load(out / "erf.pt")
    assert list(fields) == labels and all(f.shape == (64, 64) for f in fields.values())
    assert Image.open(out / "erf.png").size[0] > 300


def test_erf_tool_without_data_says_it_uses_noise(tmp_path, capsys):
    _tool("erf").main(["--models", "resnet18", "--num-images", "2", "--img-size", "48", "--out", str(tmp_path)])
    assert "no --data: averaging over 2 uniform noise images" in capsys.readouterr().out
    assert json.loads((tmp_path / "erf.json").read_text())["data"] == "uniform noise"


def test_erf_tool_names_a_missing_folder_checkpoint_or_model(tmp_path, capsys):
    tool = _tool("erf")
    base = ["--img-size", "48", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"^image folder not found: '.*missing'$"):
        tool.main([*base, "--models", "resnet18", "--data", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match=r"^no image files \(.*\) under '.*'$"):
        tool.main([*base, "--models", "resnet18", "--data", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^checkpoint file not found: '.*none\.pth'$"):
        tool.main([*base, "--models", "resnet18", "--checkpoint", str(tmp_path / "none.pth")])
    with pytest.raises(SystemExit, match=r"^unknown model 'no_such_net': expected a timm model name or a trainer"):
        tool.main([*base, "--models", "no_such_net"])
    with pytest.raises(SystemExit):
        tool.main([*base, "--models", "resnet18", "resnet34", "--checkpoint", "a.pth"])
    assert "--checkpoint needs one entry per model (2), got 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tools_take_a_trainer_config_as_the_model(tmp_path):
    """The main job's model is no timm name: the tools build it from its config (tools/model_spec.py), with its
    evaluation preprocessing and the weights of a checkpoint."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import model_spec
    finally:
        sys.path.pop(0)

    config = ROOT / "configs" / "digits_demo.yaml"
    loaded = model_spec.load_model(str(config))
    assert loaded.model.num_classes == 10 and not loaded.model.training
    assert tuple(loaded.transform(Image.new("RGB", (32, 32))).shape) == (3, 32, 32)
    # Weights unlike the seeded initialisation, so that only loading them can reproduce them.
    trained = {k: v + 1 if v.is_floating_point() else v for k, v in loaded.model.state_dict().items()}
    path = tmp_path / "digits.pth"
    torch.save({"model": trained}, path)
    again = model_spec.load_model(str(config), str(path)).model.state_dict()
    assert all(torch.equal(again[k], v) for k, v in trained.items())
    with pytest.raises(SystemExit, match=r"^config file not found: '.*missing\.yaml'$"):
        model_spec.load_model(str(tmp_path / "missing.yaml"))
