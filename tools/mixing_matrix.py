"""Plots the exact mixing matrix of one Spatial-Mamba token mixer for an image, next to Mamba's.

    python tools/mixing_matrix.py --model spatial_mamba_tiny --checkpoint best_ckpt.pth --image cat.jpg \\
        [--img-size 224] [--stage 1 --block 0] [--query ROW COL ...] --out mixing/

For block (stage, block) the mixer's output before ``out_norm`` is y = M·u per inner channel, over the L = h·w tokens
of the stage's map in raster order (``spatial_mamba.analysis``). The tool writes to ``--out``:

- ``matrices.png``: mean over channels of |M| for Mamba (scan and observation, no state fusion: lower-triangular)
  and for Spatial-Mamba (with the fusion), on one log colour scale set by the entries off the diagonal;
- ``queries.png``: the rows of both matrices for a few query tokens, folded to the h×w grid and laid over the image
  (where each query token reads from);
- ``mixing_matrix.pt``: both (L, L) matrices, the query rows, the mixer's input x, scan input u and own output y
  before ``out_norm``, and the settings. Per-channel matrices: ``spatial_mamba.analysis.mixing_matrix``.

It prints how far M·u is from the mixer's own float32 output, and the share of |M| above the diagonal: the mixing
with tokens after t in raster order, which a single raster scan cannot reach.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from PIL import Image  # noqa: E402

import spatial_mamba  # noqa: E402, F401  (registers the models with timm)
from spatial_mamba.analysis import capture_mixer, scan_inputs, summarise_mixing_matrix  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/model_spec.py, also when imported by the tests
import model_spec  # noqa: E402

# Colours span four decades below the largest off-diagonal entry: the diagonal also holds the skip term D, which is
# larger than any mixing between tokens and would push the rest of the matrix to the bottom of the scale.
DECADES = 4


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="spatial_mamba_* name, or a trainer config (.yaml) such as the main job's"
    )
    parser.add_argument("--checkpoint", default=None, help="checkpoint (official layout or plain state dict)")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--img-size", type=int, default=None, help="square input size (default: the model's)")
    parser.add_argument("--stage", type=int, default=1, help="stage index (default 1)")
    parser.add_argument("--block", type=int, default=0, help="block index within the stage (default 0)")
    parser.add_argument(
        "--query",
        type=int,
        nargs=2,
        action="append",
        metavar=("ROW", "COL"),
        help="a query token on the stage's grid, repeatable (default: the centre and three others)",
    )
    parser.add_argument("--chunk", type=int, default=32, help="channels per step; memory ~ 3*chunk*L^2*8 bytes")
    parser.add_argument("--out", required=True, help="output folder (created)")
    args = parser.parse_args(argv)
    if args.img_size is not None and args.img_size < 1:
        parser.error(f"--img-size must be a positive size, got {args.img_size}")
    return args


def _log_norm(matrices: Dict[str, torch.Tensor], rows: List[int]) -> LogNorm:
    """A log scale up to the largest entry of ``rows`` of the matrices outside the diagonal."""
    own = (torch.arange(len(rows)), torch.tensor(rows))
    top = max(m[rows].index_put(own, m.new_tensor(0.0)).max().item() for m in matrices.values())
    return LogNorm(vmin=top * 10**-DECADES, vmax=top, clip=True)


def _cmap():
    cmap = plt.get_cmap("magma")
    return cmap.with_extremes(bad=cmap(0.0))  # exact zeros (Mamba's upper triangle) take the lowest colour


def _plot_matrices(matrices: Dict[str, torch.Tensor], path: Path, title: str) -> None:
    norm = _log_norm(matrices, list(range(len(next(iter(matrices.values()))))))
    fig, axes = plt.subplots(1, len(matrices), figsize=(5.5 * len(matrices), 5), constrained_layout=True)
    for ax, (name, matrix) in zip(axes, matrices.items()):
        image = ax.imshow(matrix.numpy(), norm=norm, cmap=_cmap(), interpolation="nearest")
        ax.set(title=f"{name}: mean |M| over channels", xlabel="source token s", ylabel="output token t")
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_queries(
    picture: torch.Tensor,
    matrices: Dict[str, torch.Tensor],
    queries: List[Tuple[int, int]],
    grid: Tuple[int, int],
    path: Path,
) -> None:
    """Each query token's row of each matrix folded to the token grid, over the (H, W, 3) picture."""
    height, width = grid
    rows = [q[0] * width + q[1] for q in queries]
    norm = _log_norm(matrices, rows)
    size_y, size_x = picture.shape[:2]
    fig, axes = plt.subplots(
        len(matrices), len(queries), figsize=(3 * len(queries), 3.2 * len(matrices)), squeeze=False
    )
    for axes_row, (name, matrix) in zip(axes, matrices.items()):
        for ax, (row, col), t in zip(axes_row, queries, rows):
            ax.imshow(picture.numpy())
            ax.imshow(
                matrix[t].reshape(height, width).numpy(),
                extent=(0, size_x, size_y, 0),
                alpha=0.65,
                norm=norm,
                cmap=_cmap(),
                interpolation="nearest",
            )
            ax.plot((col + 0.5) * size_x / width, (row + 0.5) * size_y / height, "c+", markersize=12, mew=2)
            ax.set_title(f"{name}, token ({row}, {col})", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not Path(args.image).is_file():
        raise SystemExit(f"image file not found: {args.image!r}")
    if not model_spec.is_config(args.model) and args.model not in timm.list_models("spatial_mamba*"):
        raise SystemExit(
            f"unknown model {args.model!r}; expected one of {timm.list_models('spatial_mamba*')} or a .yaml"
        )
    model, transform, mean, std = model_spec.load_model(args.model, args.checkpoint, args.img_size)
    with Image.open(args.image) as image:
        x = transform(image.convert("RGB"))[None]
    try:
        capture = capture_mixer(model, x, args.stage, args.block)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    _, height, width, _ = capture.x.shape
    queries = [tuple(q) for q in args.query or []] or [
        (height // 2, width // 2),
        (height // 4, width // 4),
        (height // 4, 3 * width // 4),
        (3 * height // 4, width // 2),
    ]
    for row, col in queries:
        if not (0 <= row < height and 0 <= col < width):
            raise SystemExit(f"--query {row} {col} is outside the stage's {height}x{width} token grid")

    fused = summarise_mixing_matrix(capture.mixer, capture.x, True, args.chunk)
    mamba = summarise_mixing_matrix(capture.mixer, capture.x, False, args.chunk).mean_abs
    y = capture.y[0].permute(2, 0, 1).flatten(1).double()
    error = (fused.output - y).abs().max().item() / y.abs().max().item()
    above = torch.triu(fused.mean_abs, 1).sum().item() / fused.mean_abs.sum().item()
    print(f"{args.model} stage {args.stage} block {args.block}: {height}x{width} tokens, L = {height * width}")
    print(f"M·u vs the mixer's own output before out_norm: max |difference| / max |y| = {error:.2e}")
    print(f"share of mean |M| above the diagonal: Spatial-Mamba {above:.3f}, Mamba 0 (lower-triangular)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    matrices = {"Mamba": mamba, "Spatial-Mamba": fused.mean_abs}
    title = f"{args.model}, stage {args.stage} block {args.block}, {height}x{width} tokens"
    _plot_matrices(matrices, out / "matrices.png", title)
    picture = (x[0] * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
    _plot_queries(picture.permute(1, 2, 0), matrices, queries, (height, width), out / "queries.png")
    rows = [row * width + col for row, col in queries]
    result = dict(
        model=args.model,
        checkpoint=args.checkpoint,
        image=str(args.image),
        img_size=args.img_size,
        stage=args.stage,
        block=args.block,
        grid=(height, width),
        queries=queries,
        spatial_mamba=fused.mean_abs,
        mamba=mamba,
        spatial_mamba_rows=fused.mean_abs[rows],
        mamba_rows=mamba[rows],
        x=capture.x,
        u=scan_inputs(capture.mixer, capture.x).u,
        y=capture.y,
        relative_error=error,
        share_above_diagonal=above,
    )
    torch.save(result, out / "mixing_matrix.pt")
    print(f"wrote {out / 'matrices.png'}, {out / 'queries.png'} and {out / 'mixing_matrix.pt'}")


if __name__ == "__main__":
    main()
