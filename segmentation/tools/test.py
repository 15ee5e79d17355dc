"""Evaluates a Spatial-Mamba segmentor with mmseg.

python tools/test.py CONFIG CHECKPOINT [--out OUT] [--show] [--show-dir DIR] [--wait-time S] [--tta]
                     [--work-dir DIR] [--cfg-options KEY=VALUE ...] [--launcher {none,pytorch,slurm,mpi}]
"""

from openmmlab_tools import cli

if __name__ == "__main__":
    cli.test(cli.MMSEG)
