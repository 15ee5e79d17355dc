"""Evaluates a Spatial-Mamba segmentor with mmseg.

python tools/test.py CONFIG CHECKPOINT [--tta] [--work-dir DIR] [--cfg-options KEY=VALUE ...]
                     [--launcher {none,pytorch,slurm,mpi}]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model  # noqa: E402,F401  registers MM_SpatialMamba in mmseg

from spatial_mamba import openmmlab  # noqa: E402

if __name__ == "__main__":
    openmmlab.test()
