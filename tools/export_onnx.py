"""Exports a Spatial-Mamba classifier to ONNX with a dynamic batch and image size, and checks the file.

    python tools/export_onnx.py --model spatial_mamba_tiny [--checkpoint best_ckpt.pth] [--img-size 224] \\
        --out model.onnx

The model goes through ``torch.export`` (the scan then runs as a fixed graph of tensor operations, see
``spatial_mamba/ops/selective_scan_export.py``) and ``torch.onnx.export(..., dynamo=True)``. The written file is
then run in ONNX Runtime at the export size and at a non-square size (``--check-size``), and the largest logit
difference from PyTorch (eval mode, float32) is printed for each; the command fails if one exceeds ``--atol``.

Each stage's token map must be at least 2x2 in the exported graph, so images need height and width above 32.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import timm
import torch

import spatial_mamba  # noqa: F401  (registers the models with timm)
from spatial_mamba import compat


def _size(text: str) -> Tuple[int, int]:
    parts = text.lower().replace("x", " ").replace(",", " ").split()
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) <= 32:
        raise argparse.ArgumentTypeError(
            f"expected a size above 32 as 'S' or 'HxW' (e.g. 224 or 192x288), got {text!r}"
        )
    return (values[0], values[-1])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="registered name, e.g. spatial_mamba_tiny")
    parser.add_argument("--checkpoint", default=None, help="checkpoint file (official layout or plain state dict)")
    parser.add_argument("--num-classes", type=int, default=None, help="head size (default: the checkpoint's, 1000)")
    parser.add_argument("--img-size", type=_size, default=(224, 224), help="export size, S or HxW (default 224)")
    parser.add_argument("--check-size", type=_size, default=(160, 288), help="second, non-square check size")
    parser.add_argument("--batch-size", type=int, default=2, help="batch of the check inputs (default 2)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 18 (default 18)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed logit difference (default 1e-4)")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    args = parser.parse_args(argv)
    if args.opset < 18:
        parser.error(f"--opset must be >= 18 (the dynamo exporter's minimum), got {args.opset}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def build_model(name: str, checkpoint: str | None, num_classes: int | None) -> torch.nn.Module:
    """The eval-mode model through timm's own path; a checkpoint loads strictly (official layout accepted)."""
    if name not in timm.list_models("spatial_mamba*"):
        raise SystemExit(f"unknown model {name!r}; expected one of {timm.list_models('spatial_mamba*')}")
    kwargs = {} if num_classes is None else dict(num_classes=num_classes)
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise SystemExit(f"checkpoint file not found: {checkpoint!r}")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)))
    return timm.create_model(name, **kwargs).eval()


def export(model: torch.nn.Module, example: torch.Tensor, out: Path, opset: int) -> None:
    compat.require_dynamic_export(onnx=True)
    dynamic = torch.export.Dim.DYNAMIC
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=opset,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},),
        verbose=False,
    )
    program.save(str(out))


def check(model: torch.nn.Module, path: Path, sizes: Sequence[Tuple[int, int]], batch: int) -> list:
    """Largest |logit difference| between ONNX Runtime and PyTorch for each size."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    diffs = []
    generator = torch.Generator().manual_seed(0)
    for height, width in sizes:
        x = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {name: x.numpy()})[0]
        if got.shape != expected.shape:
            raise SystemExit(f"ONNX output shape {got.shape} differs from PyTorch's {expected.shape}")
        diffs.append(float(np.abs(got - expected).max()))
    return diffs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model, args.checkpoint, args.num_classes)
    example = torch.randn(args.batch_size, 3, *args.img_size)
    start = time.perf_counter()
    export(model, example, out, args.opset)
    print(f"exported {args.model} to {out} (opset {args.opset}) in {time.perf_counter() - start:.0f} s")
    sizes = [args.img_size, args.check_size]
    worst = 0.0
    for (height, width), diff in zip(sizes, check(model, out, sizes, args.batch_size)):
        print(f"onnxruntime vs pytorch at {height}x{width}, batch {args.batch_size}: max |logit diff| = {diff:.3g}")
        worst = max(worst, diff)
    if worst > args.atol:
        print(f"FAILED: max logit difference {worst:.3g} exceeds --atol {args.atol:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
