"""CPU speed of Spatial-Mamba-T as this checkout builds it against an earlier revision of the repository, in one
process.

    python benchmarks/cpu_revisions.py --base REV [--rounds 5] [--cases train_b8_224 infer_b8_224 ...]
        [--out benchmarks/results/cpu_revisions.json]

``REV`` is anything ``git archive`` takes (a commit, a tag; ``HEAD`` measures the uncommitted changes). Its
``spatial_mamba`` package is extracted to a temporary folder and imported under another name, next to this checkout's;
both build Spatial-Mamba-T from the same seed, and every case (those of ``cpu_peers.py``) runs in interleaved rounds,
so that the machine's changes of speed, which move single runs by up to 10% on a shared virtual machine, hit both
alike. Prints each case's median seconds and the ratio checkout / base, and writes them as JSON. The models are built
from their classes, not through timm's registry (which both packages would claim).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

import spatial_mamba
from spatial_mamba.ops.backends import cpu as cpu_kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_peers import CASES, step_fn, time_interleaved  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE_PACKAGE = "spatial_mamba_base"


def import_revision(rev: str, folder: Path):
    """The ``spatial_mamba`` package of ``rev``, imported as ``spatial_mamba_base`` from ``folder``."""
    archive = subprocess.run(["git", "archive", rev, "spatial_mamba"], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {rev!r} failed: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "spatial_mamba").rename(folder / BASE_PACKAGE)
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"{BASE_PACKAGE}.models.spatial_mamba")


def build(module) -> torch.nn.Module:
    torch.manual_seed(0)
    return module.SpatialMamba(num_classes=1000, **module.VARIANTS["spatial_mamba_tiny"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision to compare with (git archive's tree-ish)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per case (median reported)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_revisions.json"))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")

    from spatial_mamba.models import spatial_mamba as checkout

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        base = import_revision(args.base, Path(folder))
        print(f"{'case':<16}{'base':>10}{'checkout':>10}{'checkout / base':>17}")
        for case in args.cases:
            train, batch, img_size = CASES[case]
            steps = {
                name: step_fn(build(m), train, batch, img_size) for name, m in (("base", base), ("checkout", checkout))
            }
            timed = time_interleaved(steps, args.rounds)
            failed = [f"{name}: {r['error']}" for name, r in timed.items() if "error" in r]
            if failed:
                raise SystemExit(f"{case} failed: {'; '.join(failed)}")
            times = {name: r["runs_s"] for name, r in timed.items()}
            medians = {name: statistics.median(t) for name, t in times.items()}
            ratio = medians["checkout"] / medians["base"]
            results[case] = {"median_s": medians, "runs_s": times, "checkout_over_base": ratio}
            print(f"{case:<16}{medians['base']:>9.3f}s{medians['checkout']:>9.3f}s{ratio:>17.3f}", flush=True)
    report = {
        "benchmark": "cpu_revisions",
        "base": args.base,
        "base_commit": subprocess.run(
            ["git", "rev-parse", args.base], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "checkout": str(Path(spatial_mamba.__file__).parent),
        "model": "spatial_mamba_tiny",
        "cases": {case: dict(zip(("train", "batch", "img_size"), CASES[case])) for case in args.cases},
        "rounds": args.rounds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_kernels.describe_cpu(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
