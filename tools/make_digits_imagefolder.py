"""Writes scikit-learn's handwritten digits (1,797 images of 8x8 grey levels, 10 classes, shipped with the package,
no download) as an ImageFolder tree ``OUT/{train,val}/<digit>/<index>.png``, upscaled to ``--size`` pixels.

The split is stratified and seeded, so every run writes the same files; an existing complete tree is kept.

    python tools/make_digits_imagefolder.py OUT [--size 32] [--val-fraction 0.2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

STAMP = ".digits_imagefolder.json"


def write_digits(out: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Writes the tree (unless the same one is already there) and returns its description."""
    description = {"size": size, "val_fraction": val_fraction, "seed": seed}
    stamp = os.path.join(out, STAMP)
    if os.path.isfile(stamp):
        with open(stamp) as f:
            existing = json.load(f)
        if {k: existing.get(k) for k in description} == description:
            return existing
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # grey levels 0..16 -> 0..255
    indices = np.arange(len(images))
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, random_state=seed, stratify=digits.target)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, split_idx in (("train", train_idx), ("val", val_idx)):
        for label in range(10):
            os.makedirs(os.path.join(tmp, split, str(label)), exist_ok=True)
        for i in split_idx:
            image = Image.fromarray(images[i], mode="L").resize((size, size), Image.BICUBIC)
            image.save(os.path.join(tmp, split, str(digits.target[i]), f"{i:04d}.png"))
    description.update(train=len(train_idx), val=len(val_idx), classes=10)
    with open(os.path.join(tmp, STAMP), "w") as f:
        json.dump(description, f)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # a half-written tree is never mistaken for a complete one
    return description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write (train/ and val/ go inside)")
    parser.add_argument("--size", type=int, default=32, help="side of the written images in pixels")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class held out for val")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    args = parser.parse_args()
    if args.size < 8:
        parser.error(f"--size must be at least 8 (the digits are 8x8), got {args.size}")
    if not 0.0 < args.val_fraction < 1.0:
        parser.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    info = write_digits(args.out, args.size, args.val_fraction, args.seed)
    print(
        f"digits ImageFolder: {info['train']} train and {info['val']} val images, "
        f"{args.size}x{args.size} pixels, in {args.out}"
    )


if __name__ == "__main__":
    main()
