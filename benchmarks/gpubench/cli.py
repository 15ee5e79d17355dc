"""GPU benchmark of Spatial-Mamba: the scan, state-fusion and fused-observation kernels, and model throughput against
Swin and ConvNeXt.

    python benchmarks/gpu.py [--out DIR] [--only scan,fusion,observation,models] [--models a,b,...] [--batch-size 128]
                             [--img-size 224] [--iters N] [--warmup N] [--profile] [--smoke] [--time-budget 540]

Writes ``<out>/<gpu>.json`` (``h100.json``, ``h200.json``, ...; ``<gpu>-smoke.json`` with ``--smoke``) after every
measurement, so an interrupted run keeps what it measured, and prints a table at the end. ``benchmarks/README.md``
explains each figure and how the bytes behind the bandwidth figures are counted. Exits with status 1 when a
measurement failed for a reason other than running out of GPU memory, a failed check included.
"""

from __future__ import annotations

import argparse
from typing import Sequence, Tuple

import timm
import torch

from .fusion import bench_fusion
from .models import bench_models
from .observation import bench_observation
from .profiling import PROFILED_MODEL, profile_train_step
from .report import ROOT, Run
from .scan import bench_scan
from .table import print_table

SECTIONS = {"scan": bench_scan, "fusion": bench_fusion, "observation": bench_observation, "models": bench_models}


def _sections(text: str) -> Tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in SECTIONS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"--only takes a comma-separated subset of {','.join(SECTIONS)}; got {text!r}")
    return names


def _models(text: str) -> Tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if not timm.is_model(name)]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"--models takes comma-separated timm model names; unknown: {unknown or text}")
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory of the JSON file")
    parser.add_argument("--only", type=_sections, default=tuple(SECTIONS), help="sections to run (default: all)")
    parser.add_argument("--models", type=_models, default=None, help="timm model names (default: the seven)")
    parser.add_argument("--batch-size", type=_positive, default=None, help="batch of every section (default 128)")
    parser.add_argument("--img-size", type=_positive, default=None, help="model input size (default 224)")
    parser.add_argument(
        "--iters", type=_positive, default=None, help="timed iterations (default 50 kernels, 30 models)"
    )
    parser.add_argument("--warmup", type=_non_negative, default=None, help="warm-up iterations (default 20 / 10)")
    parser.add_argument("--profile", action="store_true", help=f"profile one training step of {PROFILED_MODEL}")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on any device (batch 2, 32x32, D 16, two models)"
    )
    parser.add_argument(
        "--time-budget",
        type=_non_negative,
        default=None,
        help="seconds after which no new measurement starts (default 540, smoke 0 = none)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    run = Run(args)
    run.log(f"{run.results['device']} ({run.device.type}); writing {run.path}")
    run.save()
    for section in run.sections:
        run.log(f"--- {section}")
        SECTIONS[section](run)
        run.free_memory()
        run.save()
    if args.profile:
        profile_train_step(run)
        run.save()
    print_table(run.results)
    print(f"\nwrote {run.path}", flush=True)
    return 1 if any(not error["out_of_memory"] for error in run.errors) else 0
