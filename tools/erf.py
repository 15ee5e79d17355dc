"""Effective receptive fields of timm models, side by side.

    python tools/erf.py --models spatial_mamba_tiny convnext_tiny [--checkpoint a.pth b.pth] \\
        [--data /imagenet/val] [--num-images 50] [--img-size 224] --out erf/

For each model: the gradient of the central location of the last feature map (summed over channels) with respect to
the input image, |gradient| summed over colour channels and averaged over the images (RepLKNet's and VMamba's
definition, ``spatial_mamba.analysis.effective_receptive_field``). Images are the first ``--num-images`` files under
``--data`` (searched recursively, sorted by path) with each model's own evaluation preprocessing; without ``--data``
they are uniform noise pixels put through each model's normalisation, which shows the architecture's reach rather
than what it does on natural images.

Writes ``erf.png`` (each field divided by its maximum, log colour scale), ``erf.json`` (per model: the fraction of the
image area holding 20, 30, 50 and 99% of the total contribution, smallest area first) and ``erf.pt`` (the fields).
``--checkpoint`` gives one file per model, in order (``-`` for none); a checkpoint sets the head's class count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from PIL import Image  # noqa: E402

import spatial_mamba  # noqa: E402, F401  (registers the models with timm)
from spatial_mamba.analysis import ERF_FRACTIONS, effective_receptive_field, erf_area_fractions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/model_spec.py, also when imported by the tests
import model_spec  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
DECADES = 4  # the colour scale spans four decades below each field's maximum


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="timm model names")
    parser.add_argument("--checkpoint", nargs="+", default=None, help="one checkpoint per model, '-' for none")
    parser.add_argument("--data", default=None, help="folder of images (default: noise images)")
    parser.add_argument("--num-images", type=int, default=50, help="images to average over (default 50)")
    parser.add_argument("--img-size", type=int, default=None, help="square input size (default: each model's)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward and backward (default 8)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and len(args.checkpoint) != len(args.models):
        parser.error(f"--checkpoint needs one entry per model ({len(args.models)}), got {len(args.checkpoint)}")
    for name in ("num_images", "img_size", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def image_paths(folder: str, count: int) -> List[Path]:
    """The first ``count`` image files under ``folder``, recursively, in sorted order."""
    if not Path(folder).is_dir():
        raise SystemExit(f"image folder not found: {folder!r}")
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise SystemExit(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder!r}")
    return paths[:count]


def load_images(transform, mean, std, paths: List[Path], count: int) -> torch.Tensor:
    """(N, 3, S, S) inputs with the model's preprocessing: the image files, or ``count`` noise images of the size
    the preprocessing gives."""
    if not paths:
        size = transform(Image.new("RGB", (64, 64))).shape[-2:]
        pixels = torch.rand(count, 3, *size, generator=torch.Generator().manual_seed(0))
        return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(transform(image.convert("RGB")))
    return torch.stack(images)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    checkpoints = [None if c == "-" else c for c in args.checkpoint or ["-"] * len(args.models)]
    for name, checkpoint in zip(args.models, checkpoints):
        model_spec.check_spec(name, checkpoint)
    paths = image_paths(args.data, args.num_images) if args.data is not None else []
    if paths:
        print(f"averaging over {len(paths)} images from {args.data}")
    else:
        print(f"no --data: averaging over {args.num_images} uniform noise images, normalised for each model")

    fields, summary = {}, {}
    for name, checkpoint in zip(args.models, checkpoints):
        label = name if checkpoint is None else f"{name} ({Path(checkpoint).name})"
        model, transform, mean, std = model_spec.load_model(name, checkpoint, args.img_size)
        images = load_images(transform, mean, std, paths, args.num_images)
        fields[label] = effective_receptive_field(model, images, args.batch_size)
        areas = erf_area_fractions(fields[label])
        summary[label] = dict(model=name, checkpoint=checkpoint, area_fraction={f"{f:g}": a for f, a in areas.items()})
        print(f"{label}: image area holding " + ", ".join(f"{f:.0%}: {a:.2%}" for f, a in areas.items()))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(fields), figsize=(4 * len(fields), 4.4), squeeze=False, constrained_layout=True)
    norm = LogNorm(vmin=10**-DECADES, vmax=1, clip=True)
    for ax, (label, field) in zip(axes[0], fields.items()):
        shown = ax.imshow((field / field.max()).numpy(), norm=norm, cmap="viridis")
        ax.set_title(f"{label}\n50%: {summary[label]['area_fraction']['0.5']:.2%} of the area", fontsize=9)
        ax.axis("off")
    fig.colorbar(shown, ax=axes[0].tolist(), shrink=0.8, label="ERF / max")
    fig.savefig(out / "erf.png", dpi=120)
    plt.close(fig)
    source = args.data if paths else "uniform noise"
    settings = dict(img_size=args.img_size, num_images=len(paths) or args.num_images, data=source)
    (out / "erf.json").write_text(json.dumps(dict(settings, fractions=list(ERF_FRACTIONS), models=summary), indent=2))
    torch.save(fields, out / "erf.pt")
    print(f"wrote {out / 'erf.png'}, {out / 'erf.json'} and {out / 'erf.pt'}")


if __name__ == "__main__":
    main()
