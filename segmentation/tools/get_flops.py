"""Parameters and FLOPs of a Spatial-Mamba segmentor, custom ops included (see openmmlab_tools.cli.flops).

    python tools/get_flops.py CONFIG [--shape H W] [--cfg-options KEY=VALUE ...]

The default input, 2048x512, is the one of the official numbers (official README, segmentation results table).
"""

from openmmlab_tools import cli

if __name__ == "__main__":
    cli.flops(cli.MMSEG)
