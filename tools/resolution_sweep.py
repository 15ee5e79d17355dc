"""Top-1 (and top-5) of a trainer checkpoint on the validation split at several input sizes.

    python tools/resolution_sweep.py --cfg configs/digits_demo.yaml --checkpoint best_ckpt.pth \\
        --data-path digits/ --sizes 32 48 64 [--batch-size 64] [--opts KEY VALUE ...] --out sweep/

For each size the config is the trainer's (``--cfg``, then ``--opts``, then ``--batch-size`` and ``--data-path``, as
``classification/main.py`` reads them) with DATA.IMG_SIZE set to that size; the model, the evaluation transform
(resize to IMG_SIZE·256/224 and centre crop, or a plain resize with TEST.CROP False), the val split (``DIR/val``, or
``val.zip`` with DATA.ZIP_MODE) and the accuracy computation are the trainer's own. As in the trainer, images are
not resized at sizes of 32 px or less: they are evaluated at their stored size, which the output records.

Writes ``resolution_sweep.json`` (per size: top-1, top-5 when the head has at least 5 classes, the number of
images, the input the model saw) and ``resolution_sweep.png`` (top-1 against the size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python tools/resolution_sweep.py` puts tools/ on the path, not the repository
    sys.path.insert(0, str(ROOT))

from classification.checkpoint import read_checkpoint  # noqa: E402
from classification.config import UsageError, get_config  # noqa: E402
from classification.data import build_dataset  # noqa: E402
from classification.engine import resolve_amp, validate  # noqa: E402
from classification.models import build_model  # noqa: E402
from spatial_mamba.checkpoint import CheckpointError  # noqa: E402

JSON, PNG = "resolution_sweep.json", "resolution_sweep.png"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", required=True, metavar="FILE", help="the trainer config the checkpoint was made with")
    parser.add_argument("--checkpoint", required=True, help="trainer checkpoint (official layout) or state dict")
    parser.add_argument("--data-path", required=True, help="ImageFolder root with val/ (as the trainer's)")
    parser.add_argument("--sizes", type=int, nargs="+", required=True, help="input sizes (DATA.IMG_SIZE) to try")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward (default DATA.BATCH_SIZE)")
    parser.add_argument("--opts", nargs="+", default=None, help="config overrides: KEY VALUE pairs")
    parser.add_argument("--out", required=True, help="output folder (created)")
    args = parser.parse_args(argv)
    for size in args.sizes:
        if size < 1:
            raise SystemExit(f"--sizes must be positive input sizes in pixels, got {size}")
    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit(f"--batch-size must be positive, got {args.batch_size}")
    for name, path in (("config", args.cfg), ("checkpoint", args.checkpoint)):
        if not os.path.isfile(path):
            raise SystemExit(f"{name} file not found: {path!r}")
    if not os.path.isdir(args.data_path):
        raise SystemExit(f"data folder not found: {args.data_path!r}")
    return args


def sweep_config(args: argparse.Namespace, size: int | None = None):
    """The trainer's config for these arguments (``get_config``), at DATA.IMG_SIZE ``size`` when given."""
    # Mixup/CutMix only act in training; off, the trainer's rule that they need an even batch does not apply.
    opts = list(args.opts or []) + ["AUG.MIXUP", "0", "AUG.CUTMIX", "0", "AUG.CUTMIX_MINMAX", "None"]
    opts += ["DATA.IMG_SIZE", str(size)] if size is not None else []
    flags = argparse.Namespace(cfg=args.cfg, opts=opts, batch_size=args.batch_size, data_path=args.data_path)
    return get_config(flags)


def check_val_split(config) -> None:
    root = config.DATA.DATA_PATH
    needed = ["val.zip", "val_map.txt"] if config.DATA.ZIP_MODE else ["val"]
    for name in needed:
        if not os.path.exists(os.path.join(root, name)):
            raise SystemExit(f"data folder {root!r} has no val split: {os.path.join(root, name)!r} does not exist")


def plot(results, trained_size: int, title: str, path: Path) -> None:
    ordered = sorted(results, key=lambda r: r["size"])
    sizes = [r["size"] for r in ordered]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [r["top1"] for r in ordered], "o-", label="top-1")
    if ordered[0]["top5"] is not None:
        ax.plot(sizes, [r["top5"] for r in ordered], "s--", alpha=0.6, label="top-5")
    ax.axvline(trained_size, color="grey", linestyle=":", label=f"config size {trained_size}")
    ax.set_xlabel("input size (px)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(args: argparse.Namespace) -> dict:
    base = sweep_config(args)
    check_val_split(base)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(base)
    model.load_state_dict(read_checkpoint(args.checkpoint, model, None)["model"])
    model.to(device)
    amp = resolve_amp(base, device)
    num_classes = base.MODEL.NUM_CLASSES
    results = []
    for size in args.sizes:
        config = sweep_config(args, size)
        dataset = build_dataset(False, config)
        if len(dataset) == 0:
            raise SystemExit(f"the val split of {config.DATA.DATA_PATH!r} has no images")
        if max(dataset.targets) >= num_classes:
            raise SystemExit(
                f"the val split of {config.DATA.DATA_PATH!r} has {max(dataset.targets) + 1} classes but the model "
                f"has MODEL.NUM_CLASSES={num_classes} outputs"
            )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=config.DATA.BATCH_SIZE,
            num_workers=config.DATA.NUM_WORKERS,
            pin_memory=config.DATA.PIN_MEMORY and device.type == "cuda",
        )
        val = validate(config, loader, model, amp)
        top5 = val["acc5"] if num_classes >= 5 else None
        seen = list(dataset[0][0].shape[-2:])
        results.append(dict(size=size, top1=val["acc1"], top5=top5, num_images=val["count"], input_size=seen))
        top5_text = f", top-5 {top5:6.2f}%" if top5 is not None else ""
        resized = "" if seen == [size, size] else f" (not resized: {seen[0]}x{seen[1]} input)"
        print(f"size {size}: top-1 {val['acc1']:6.2f}%{top5_text} on {val['count']} images{resized}")
    return dict(
        checkpoint=args.checkpoint,
        config=args.cfg,
        opts=list(args.opts or []),
        data_path=args.data_path,
        model=base.MODEL.NAME,
        config_img_size=base.DATA.IMG_SIZE,
        num_classes=num_classes,
        results=results,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        summary = sweep(args)
    except (UsageError, CheckpointError) as err:
        raise SystemExit(str(err)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON).write_text(json.dumps(summary, indent=2))
    title = f"{summary['model']}: {Path(args.checkpoint).name} on {args.data_path}"
    plot(summary["results"], summary["config_img_size"], title, out / PNG)
    print(f"wrote {out / JSON} and {out / PNG}")


if __name__ == "__main__":
    main()
