"""Parameters and FLOPs of a Spatial-Mamba segmentor, custom ops included (see spatial_mamba.openmmlab.flops).

    python tools/get_flops.py CONFIG [--shape H W] [--cfg-options KEY=VALUE ...]

The default input, 2048x512, is the one of the official numbers (SPEC §3c, §6).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model  # noqa: E402,F401  registers MM_SpatialMamba in mmseg

from spatial_mamba import openmmlab  # noqa: E402

if __name__ == "__main__":
    openmmlab.flops(default_shape=(2048, 512))
