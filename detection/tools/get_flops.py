"""Parameters and FLOPs of a Spatial-Mamba detector, custom ops included (see openmmlab_tools.cli.flops).

    python tools/get_flops.py CONFIG [--shape H W] [--cfg-options KEY=VALUE ...]

The default input, 1280x800, is the one of the official numbers (official README, detection results table).
"""

from openmmlab_tools import cli

if __name__ == "__main__":
    cli.flops(cli.MMDET)
