"""Prints the top-k classes of a classifier, with their probabilities, for image files.

    python tools/predict.py cat.jpg dog.jpg --model spatial_mamba_tiny --checkpoint spatialmamba_tiny.pth
    python tools/predict.py digit.png --cfg configs/digits_demo.yaml --checkpoint best_ckpt.pth --classes digits/ \\
        [--img-size 32] [--topk 3] [--json predictions.json]

The model is a timm model (``--model``: its own evaluation transform, at its default size unless ``--img-size``) or
the trainer's (``--cfg`` and ``--opts``: ``classification``'s model and evaluation transform at DATA.IMG_SIZE, which
``--img-size`` sets; like the trainer, it does not resize images at 32 px or less). ``--checkpoint`` takes the
official training layout or a plain state dict.

Class names: with ``--classes DIR``, the sorted subfolder names of an ImageFolder split, the order in which
torchvision's ImageFolder, and so the trainer, numbers the classes (DIR is the split, or a root whose ``train/``,
else ``val/``, is read); trainer checkpoints do not store them. Without it, ImageNet-1k's names (timm's
``ImageNetInfo``) for a 1000-class head, and the class indices alone for any other head.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Sequence

import timm
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import ImageNetInfo
from torchvision.datasets.folder import find_classes

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/model_spec.py, also when imported by the tests

import model_spec  # noqa: E402

from classification.config import UsageError  # noqa: E402
from spatial_mamba.checkpoint import CheckpointError  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="timm model name, e.g. spatial_mamba_tiny")
    source.add_argument("--cfg", metavar="FILE", help="trainer config (the model of classification/main.py)")
    parser.add_argument("--opts", nargs="+", default=None, help="with --cfg: config overrides, KEY VALUE pairs")
    parser.add_argument("--checkpoint", default=None, help="weights (official layout or state dict); default random")
    parser.add_argument("--img-size", type=int, default=None, help="square input size (default: the model's)")
    parser.add_argument("--topk", type=int, default=5, help="classes to print per image (default 5)")
    parser.add_argument("--classes", default=None, metavar="DIR", help="ImageFolder root or split naming the classes")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the predictions to this JSON file")
    args = parser.parse_args(argv)
    if args.opts and not args.cfg:
        raise SystemExit("--opts sets config keys: it needs --cfg")
    for name in ("topk", "img_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {value}")
    for path in args.images:
        if not os.path.isfile(path):
            raise SystemExit(f"image file not found: {path!r}")
    for name, path in (("config", args.cfg), ("checkpoint", args.checkpoint)):
        if path is not None and not os.path.isfile(path):
            raise SystemExit(f"{name} file not found: {path!r}")
    if args.classes is not None and not os.path.isdir(args.classes):
        raise SystemExit(f"classes folder not found: {args.classes!r}")
    if args.model is not None and not timm.is_model(args.model):
        raise SystemExit(f"unknown timm model {args.model!r}")
    return args


def load_model(args: argparse.Namespace):
    """The model in evaluation mode and its evaluation transform of a PIL image (``tools/model_spec.py``)."""
    loaded = model_spec.load_model(args.cfg or args.model, args.checkpoint, args.img_size, args.opts or ())
    return loaded.model, loaded.transform


def class_names(folder: str | None, num_classes: int) -> List[str] | None:
    if folder is None:
        return ImageNetInfo().label_descriptions() if num_classes == 1000 else None
    split = next((os.path.join(folder, s) for s in ("train", "val") if os.path.isdir(os.path.join(folder, s))), folder)
    try:
        names, _ = find_classes(split)
    except FileNotFoundError:
        raise SystemExit(f"classes folder {split!r} has no class subfolders") from None
    if len(names) != num_classes:
        raise SystemExit(
            f"classes folder {split!r} has {len(names)} classes but the model's head has {num_classes} outputs"
        )
    return names


@torch.no_grad()
def predict(model, transform, path: str, names: List[str] | None, k: int) -> List[dict]:
    try:
        with Image.open(path) as image:
            x = transform(image.convert("RGB"))[None]
    except (UnidentifiedImageError, OSError) as err:
        raise SystemExit(f"cannot read image {path!r}: {err}") from None
    device = next(model.parameters()).device
    top = model(x.to(device)).float().softmax(-1)[0].topk(k)
    return [
        dict(index=i, name=names[i] if names else None, probability=p)
        for p, i in zip(top.values.tolist(), top.indices.tolist())
    ]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.checkpoint is None:
        print("no --checkpoint: the weights are random", file=sys.stderr)
    try:
        model, transform = load_model(args)
    except (UsageError, CheckpointError) as err:
        raise SystemExit(str(err)) from None
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    names = class_names(args.classes, model.num_classes)
    k = min(args.topk, model.num_classes)
    results = []
    for path in args.images:
        top = predict(model, transform, path, names, k)
        results.append(dict(image=path, topk=top))
        print(path)
        for p in top:
            print(f"  {p['probability']:.4f}  {p['index']:>4}  {p['name'] or ''}".rstrip())
    if args.json is not None:
        summary = dict(
            model=args.model or args.cfg,
            checkpoint=args.checkpoint,
            classes=args.classes or ("imagenet-1k" if names else None),
            predictions=results,
        )
        Path(args.json).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
