"""CPU speed of Spatial-Mamba-T against timm's Swin-T, ConvNeXt-T and MambaOut-T, measured in one process.

    python benchmarks/cpu_peers.py [--rounds 3] [--cases train_b8_224 infer_b8_224 infer_b1_512 infer_b1_1024]
        [--out benchmarks/results/cpu_peers.json]

Cases: a training step (forward, backward and an SGD update) at batch 8, 224x224, and inference (``torch.no_grad``,
eval mode) at batch 8 224x224, batch 1 512x512 and batch 1 1024x1024, all on random data with randomly initialised
models. Every case runs in interleaved rounds (one call of each model per round, after one warm-up call each), so
that a change of load on a shared machine hits every model alike; the table holds median seconds and each model's
ratio to Swin-T. Prints the table and writes it, with the machine and the thread count, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import timm
import torch

import spatial_mamba  # noqa: F401  (registers spatial_mamba_* with timm)
from spatial_mamba.ops.backends import cpu as cpu_kernels

MODELS = {
    "Spatial-Mamba-T": "spatial_mamba_tiny",
    "Swin-T": "swin_tiny_patch4_window7_224",
    "ConvNeXt-T": "convnext_tiny",
    "MambaOut-T": "mambaout_tiny",
}
# Training cases also time Spatial-Mamba-T with its mixers keeping their intermediates (no recomputation in the
# backward pass): the price of the default's smaller memory, measured in the same rounds.
TRAIN_ONLY = {"Spatial-Mamba-T kept": ("spatial_mamba_tiny", {"recompute_mixer": False})}
REFERENCE = "Swin-T"
# name: (training?, batch, image size)
CASES = {
    "train_b8_224": (True, 8, 224),
    "infer_b8_224": (False, 8, 224),
    "infer_b1_512": (False, 1, 512),
    "infer_b1_1024": (False, 1, 1024),
}


def build(name: str, img_size: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    # Swin's window attention is built for one input size; the others take any size.
    if name.startswith("swin"):
        kwargs["img_size"] = img_size
    return timm.create_model(name, num_classes=1000, **kwargs)


def models_of(case: str) -> Dict[str, tuple]:
    """label -> (timm name, extra arguments) of the models timed in ``case``."""
    models = {label: (name, {}) for label, name in MODELS.items()}
    return {**models, **TRAIN_ONLY} if CASES[case][0] else models


def step_fn(model: torch.nn.Module, train: bool, batch: int, img_size: int) -> Callable[[], None]:
    """One training step or one inference call of ``model`` on fixed random data."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, generator=gen)
    if not train:
        model.eval()

        def infer():
            with torch.no_grad():
                model(x)

        return infer
    model.train()
    y = torch.randint(0, 1000, (batch,), generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def train_step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train_step


def time_interleaved(steps: Dict[str, Callable[[], None]], rounds: int) -> Dict[str, list]:
    """label -> seconds of each of ``rounds`` calls of its step, one call of every step per round, after one untimed
    call of each (allocator, oneDNN primitive caches, the kernels' first compile)."""
    for step in steps.values():
        step()
    times: Dict[str, list] = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            start = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - start)
    return times


def run_case(case: str, rounds: int) -> Dict[str, Dict[str, object]]:
    train, batch, img_size = CASES[case]
    steps = {
        label: step_fn(build(name, img_size, **kwargs), train, batch, img_size)
        for label, (name, kwargs) in models_of(case).items()
    }
    times = time_interleaved(steps, rounds)
    medians = {label: statistics.median(t) for label, t in times.items()}
    return {
        label: {
            "median_s": medians[label],
            "runs_s": times[label],
            "ratio_to_swin_t": medians[label] / medians[REFERENCE],
        }
        for label in steps
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per case (median reported)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_peers.json"))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")

    results = {}
    labels = [*MODELS, *TRAIN_ONLY]
    header = f"{'case':<16}" + "".join(f"{label:>21}" for label in labels) + f"{'ours / Swin-T':>15}"
    print(header)
    for case in args.cases:
        results[case] = run_case(case, args.rounds)
        row = results[case]
        cells = (f"{row[label]['median_s']:>20.3f}s" if label in row else f"{'-':>21}" for label in labels)
        print(f"{case:<16}" + "".join(cells) + f"{row['Spatial-Mamba-T']['ratio_to_swin_t']:>15.2f}", flush=True)
    report = {
        "benchmark": "cpu_peers",
        "models": {**MODELS, **{label: f"{name} {kwargs}" for label, (name, kwargs) in TRAIN_ONLY.items()}},
        "cases": {case: dict(zip(("train", "batch", "img_size"), CASES[case])) for case in args.cases},
        "rounds": args.rounds,
        "torch": torch.__version__,
        "timm": timm.__version__,
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
