"""Trains a Spatial-Mamba detector with mmdet.

python tools/train.py CONFIG [--work-dir DIR] [--amp] [--auto-scale-lr] [--resume [CKPT]]
                             [--cfg-options KEY=VALUE ...] [--launcher {none,pytorch,slurm,mpi}]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model  # noqa: E402,F401  registers MM_SpatialMamba in mmdet

from spatial_mamba import openmmlab  # noqa: E402

if __name__ == "__main__":
    openmmlab.train()
