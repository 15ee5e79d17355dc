"""Parameter and FLOP count of a registered Spatial-Mamba variant, counted like the official code.

    python tools/flops.py --model spatial_mamba_tiny [--img-size 224]

The last line is ``<model> params=<N> gflops=<G>`` (G with two decimals), e.g.
``spatial_mamba_tiny params=26748862 gflops=4.47``.
"""

import argparse

import timm

import spatial_mamba  # noqa: F401  (registers the models)
from spatial_mamba.flops import count_flops, count_params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spatial_mamba_tiny", help="registered model name")
    parser.add_argument("--img-size", type=int, nargs="+", default=[224], help="H [W] of the input image")
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    if len(args.img_size) not in (1, 2) or min(args.img_size) < 1:
        parser.error(f"--img-size takes one or two positive sizes, got {args.img_size}")
    height, width = args.img_size if len(args.img_size) == 2 else args.img_size * 2
    if args.model not in timm.list_models("spatial_mamba*"):
        parser.error(f"--model must be one of {timm.list_models('spatial_mamba*')}, got {args.model!r}")
    model = timm.create_model(args.model, num_classes=args.num_classes)
    params = count_params(model)
    flops = count_flops(model, (3, height, width))
    print(f"{args.model} params={params} gflops={flops / 1e9:.2f}")


if __name__ == "__main__":
    main()
