"""CPU training-step benchmark: Spatial-Mamba-T vs timm's Swin-T, measured in one process on the same machine.

    .venv/bin/python benchmarks/cpu_train_step.py [--batch-size 8] [--img-size 224] [--steps 3]

Each step is forward + backward + SGD update on random data (batch 8, 224x224 by default). Prints the median step
time of each model and their ratio, and writes benchmarks/results/cpu_train_step.json. Goal: ratio <= 2.
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import timm
import torch

import spatial_mamba  # noqa: F401  (registers spatial_mamba_* with timm)


def time_train_step(name: str, batch: int, img: int, steps: int, warmup: int) -> list:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, img, img)
    y = torch.randint(0, 1000, (batch,))
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_train_step.json"))
    args = parser.parse_args()
    models = ("spatial_mamba_tiny", "swin_tiny_patch4_window7_224")
    results = {}
    for name in models:
        times = time_train_step(name, args.batch_size, args.img_size, args.steps, args.warmup)
        results[name] = {"median_s": statistics.median(times), "all_s": times}
        print(
            f"{name:<32} train step: median {statistics.median(times):.3f} s  (runs: "
            + ", ".join(f"{t:.3f}" for t in times)
            + ")"
        )
    ratio = results[models[0]]["median_s"] / results[models[1]]["median_s"]
    print(f"ratio spatial_mamba_tiny / swin_tiny = {ratio:.2f}  (goal <= 2.00)")
    report = {
        "benchmark": "cpu_train_step",
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "results": results,
        "ratio": ratio,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
