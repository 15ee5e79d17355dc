"""Trains a Spatial-Mamba detector with mmdet.

python tools/train.py CONFIG [--work-dir DIR] [--amp] [--auto-scale-lr] [--resume [CKPT]] [--data-path DIR]
                             [--cfg-options KEY=VALUE ...] [--launcher {none,pytorch,slurm,mpi}]
"""

from openmmlab_tools import cli

if __name__ == "__main__":
    cli.train(cli.MMDET)
