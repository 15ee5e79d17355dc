"""A model as the analysis tools take it (``tools/predict.py``, ``tools/mixing_matrix.py``, ``tools/erf.py``): a timm
name (``spatial_mamba_tiny``, ``swin_tiny_patch4_window7_224``, ...) or a trainer config file (``*.yaml``: the model
``classification/main.py`` builds from it, such as the main job's ``configs/digits_demo.yaml``), with optional weights
and its evaluation preprocessing."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NamedTuple, Sequence, Tuple

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python tools/<tool>.py` puts tools/ on the path, not the repository
    sys.path.insert(0, str(ROOT))

import spatial_mamba  # noqa: E402, F401  (registers the models with timm)
from classification.checkpoint import read_checkpoint  # noqa: E402
from classification.config import get_config  # noqa: E402
from classification.data import build_transform  # noqa: E402
from classification.models import build_model  # noqa: E402
from spatial_mamba.analysis import create_model, image_transform  # noqa: E402

__all__ = ["LoadedModel", "check_spec", "is_config", "load_model"]


class LoadedModel(NamedTuple):
    model: torch.nn.Module  # in evaluation mode
    transform: object  # PIL image -> normalised (3, S, S) tensor
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


def is_config(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def check_spec(spec: str, checkpoint: str | None = None) -> None:
    """Exits with a one-line message for an unknown model, a missing config file or a missing checkpoint."""
    if is_config(spec) and not os.path.isfile(spec):
        raise SystemExit(f"config file not found: {spec!r}")
    if not is_config(spec) and not timm.is_model(spec):
        raise SystemExit(f"unknown model {spec!r}: expected a timm model name or a trainer config (.yaml)")
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise SystemExit(f"checkpoint file not found: {checkpoint!r}")


def load_model(
    spec: str, checkpoint: str | None = None, img_size: int | None = None, opts: Sequence[str] = ()
) -> LoadedModel:
    """The model of ``spec`` in evaluation mode, with ``checkpoint``'s weights, and its evaluation preprocessing at
    ``img_size`` (default: the model's, or the config's DATA.IMG_SIZE). ``opts`` (KEY VALUE ...) override config keys.
    Weights a checkpoint does not set are drawn from seed 0, so runs repeat."""
    check_spec(spec, checkpoint)
    torch.manual_seed(0)
    if is_config(spec):
        opts = [*opts, *(["DATA.IMG_SIZE", str(img_size)] if img_size else [])]
        config = get_config(argparse.Namespace(cfg=spec, opts=opts))
        model = build_model(config)
        if checkpoint is not None:  # the trainer's own reader: a checkpoint of another architecture is an error
            model.load_state_dict(read_checkpoint(checkpoint, model, None)["model"])
        return LoadedModel(model.eval(), build_transform(False, config), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    if opts:
        raise SystemExit("--opts sets trainer config keys: it needs a config file (.yaml) as the model")
    model = create_model(spec, checkpoint)
    transform, mean, std = image_transform(model, img_size or model.pretrained_cfg["input_size"][-1])
    return LoadedModel(model, transform, mean, std)
