"""Shared fixtures: a tiny learnable ImageFolder, a tiny-model config, and launchers for main.py subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "classification" / "main.py"
NUM_CLASSES = 4
TRAIN_PER_CLASS, VAL_PER_CLASS = 12, 4

# The whole official recipe (RandAugment, random erasing, Mixup/CutMix, label smoothing, EMA, MESA from epoch 0 of 2)
# on a 4-class, 32x32 problem with a model of a few thousand parameters: fast, and every random source is exercised.
TINY_CONFIG = """
DATA:
  IMG_SIZE: 32
  BATCH_SIZE: 4
  NUM_WORKERS: 0
MODEL:
  NAME: tiny_test
  NUM_CLASSES: 4
  DROP_PATH_RATE: 0.1
  SPATIALMAMBA:
    EMBED_DIM: 8
    DEPTHS: [1, 1, 1, 1]
TRAIN:
  EPOCHS: 2
  WARMUP_EPOCHS: 1
  BASE_LR: 0.5
  WARMUP_LR: 0.005
  MIN_LR: 0.005
  MESA: 1.0
MODEL_EMA_DECAY: 0.9
PRINT_FREQ: 2
"""


def write_image_folder(root: Path, classes=None, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS):
    """Class k is a bright square in quadrant k on noise: learnable in a few steps."""
    rng = np.random.default_rng(0)
    classes = classes or {split: [f"class{k}" for k in range(NUM_CLASSES)] for split in ("train", "val")}
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for k, name in enumerate(classes[split]):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = rng.integers(0, 80, size=(32, 32, 3), dtype=np.uint8)
                row, col = divmod(k % 4, 2)
                image[4 + 16 * row : 12 + 16 * row, 4 + 16 * col : 12 + 16 * col] = 230
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    return path


def subprocess_env() -> dict:
    env = dict(os.environ)
    # One thread per process (torchrun's default for several processes) for every launcher, so that runs launched
    # differently compute bit-identical results.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run_torchrun(args, nproc=2, timeout=240, module="torch.distributed.run") -> subprocess.CompletedProcess:
    """Runs main.py under a launcher (torchrun, or the official ``torch.distributed.launch``) from classification/."""
    launcher = [sys.executable, "-m", module, f"--nproc_per_node={nproc}", "--master_port", str(free_port())]
    if module == "torch.distributed.run":
        launcher.insert(3, "--standalone")
        launcher = launcher[:-2]
    return subprocess.run(
        [*launcher, str(MAIN), *map(str, args)],
        cwd=MAIN.parent,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_single(args, timeout=180) -> subprocess.CompletedProcess:
    """Runs main.py as one plain process (no launcher)."""
    return subprocess.run(
        [sys.executable, str(MAIN), *map(str, args)],
        cwd=MAIN.parent,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_workers(args, nproc=2, log_dir: Path = None):
    """Starts ``nproc`` main.py workers with the environment a launcher would give them; returns the Popen list,
    so a test can kill each worker by its pid."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = subprocess_env()
        env.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        out = open(log_dir / f"worker{rank}.txt", "w") if log_dir else subprocess.DEVNULL
        procs.append(
            subprocess.Popen(
                [sys.executable, str(MAIN), *map(str, args)], cwd=MAIN.parent, env=env, stdout=out, stderr=out
            )
        )
    return procs
