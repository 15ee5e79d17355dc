"""Where the CPU time of Spatial-Mamba-T goes: torch.profiler over a training step and an inference call.

    python benchmarks/cpu_profile.py [--batch-size 8] [--img-size 224] [--top 12]
        [--out benchmarks/results/cpu_profile.json]

Random data and weights, eval mode and ``torch.no_grad`` for inference, forward + backward + SGD step for training.
After one untimed call, one profiled call of each; prints, for each, the operators with the most self CPU time
(aten ops, and the scan's autograd Function as one entry) and their share of the total, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import spatial_mamba  # noqa: F401  (registers spatial_mamba_* with timm)
from spatial_mamba.ops.backends import cpu as cpu_kernels


def table(prof, top: int):
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total}
        for e in events[:top]
    ], total / 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_profile.json"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = timm.create_model("spatial_mamba_tiny", num_classes=1000)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 1000, (args.batch_size,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def train_step():
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer():
        model.eval()
        with torch.no_grad():
            model(x)

    report = {
        "benchmark": "cpu_profile",
        "model": "spatial_mamba_tiny",
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_kernels.describe_cpu(),
        "results": {},
    }
    for name, fn in (("inference", infer), ("train_step", train_step)):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        rows, total_ms = table(prof, args.top)
        report["results"][name] = {"total_self_ms": total_ms, "top": rows}
        print(f"\n{name}: {total_ms:.0f} ms of self CPU time")
        for row in rows:
            print(f"  {row['share']:6.1%} {row['self_ms']:9.1f} ms {row['calls']:6d}x  {row['op']}")
    report["load_average_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"report written to {args.out}")


if __name__ == "__main__":
    main()
