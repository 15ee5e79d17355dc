"""The official surface that scripts and user code depend on: checkpoints from URLs, TEST.SEQUENTIAL, the official
flags, and a clear message for a config file that is not valid YAML."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest
import torch

from classification.checkpoint import read_checkpoint
from classification.config import UsageError, load_config
from classification.data import build_loader
from classification.distributed import DistInfo
from classification.main import choose_checkpoint, parse_option
from classification.models import build_model

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "classification" / "configs" / "spatialmamba" / "spatialmamba_tiny.yaml"
SMALL = ["MODEL.SPATIALMAMBA.EMBED_DIM", "8", "MODEL.SPATIALMAMBA.DEPTHS", "[1, 1, 1, 1]", "MODEL.NUM_CLASSES", "4"]


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A checkpoint on an HTTP server on the loopback interface, and torch's hub cache in tmp_path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    folder = tmp_path / "served"
    folder.mkdir()
    torch.manual_seed(0)
    model = build_model(load_config(TINY, SMALL))
    torch.save({"model": model.state_dict(), "epoch": 3}, folder / "weights.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder, model
    server.shutdown()
    server.server_close()
    thread.join()


def test_checkpoints_are_read_from_http_and_file_urls(served, tmp_path):
    base, folder, model = served
    fresh = build_model(load_config(TINY, SMALL))
    for url in (f"{base}/weights.pth", (folder / "weights.pth").as_uri()):
        checkpoint = read_checkpoint(url, fresh, None)
        assert checkpoint["epoch"] == 3
        for name, tensor in model.state_dict().items():
            assert torch.equal(checkpoint["model"][name], tensor), name
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / "weights.pth").is_file()  # downloaded once, cached
    with pytest.raises(Exception, match=r"could not download checkpoint 'http://127\.0\.0\.1:\d+/missing\.pth'"):
        read_checkpoint(f"{base}/missing.pth", fresh, None)


def test_resume_from_a_url_is_what_the_run_starts_from(served, tmp_path):
    base, _, _ = served
    args = parse_option(
        ["--cfg", str(TINY), "--resume", f"{base}/weights.pth", "--output", str(tmp_path), "--tag", "t"]
    )
    from classification.config import get_config

    assert choose_checkpoint(get_config(args), training=True) == (f"{base}/weights.pth", True)


def test_official_flags_are_accepted():
    args = parse_option(["--cfg", str(TINY), "--enable_preload", "--enable_persistance", "--fused_layernorm"])
    assert args.enable_preload and args.enable_persistance and args.fused_layernorm


@pytest.mark.parametrize("sequential, expected", [(False, [1, 3, 5, 7, 9, 11, 13, 15]), (True, list(range(16)))])
def test_test_sequential_makes_every_rank_evaluate_the_whole_val_set(image_folder, sequential, expected):
    config = load_config(
        TINY, [*SMALL, "DATA.DATA_PATH", str(image_folder), "DATA.NUM_WORKERS", "0", "TEST.SEQUENTIAL", str(sequential)]
    )
    dist_info = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    _, loader_val, _ = build_loader(config, dist_info, train=False)
    assert list(loader_val.sampler) == expected


@pytest.mark.parametrize(
    "text, where, found",
    [
        ("MODEL:\n  NAME: x\n   BAD: 1\n", "line 3, column 7", "mapping values are not allowed here"),
        ("MODEL:\n\tNAME: x\n", "line 2, column 1", "found character '\\\\t' that cannot start any token"),
        ("TRAIN:\n  EPOCHS: [1, 2\n", "line 3, column 1", "expected ',' or ']'"),
    ],
)
def test_a_config_file_that_is_not_yaml_is_named_with_what_was_expected(tmp_path, text, where, found):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_config(str(path))
    message = str(info.value)
    assert "\n" not in message and repr(str(path)) in message and where in message
    assert found.replace("\\\\", "\\") in message and "expected a mapping of config keys" in message


def test_a_config_file_that_is_not_yaml_stops_main_without_a_traceback(tmp_path, capsys):
    from classification.main import main

    path = tmp_path / "broken.yaml"
    path.write_text("MODEL:\n  NAME: x\n   BAD: 1\n")
    assert main(["--cfg", str(path), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file {str(path)!r} is not valid YAML at line 3") and "Traceback" not in err
