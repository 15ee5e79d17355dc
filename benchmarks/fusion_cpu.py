"""CPU benchmark of the state fusion, the fused observation and the selective scan: the reference backend against the
compiled ``cpu`` backend (``spatial_mamba/ops/backends/cpu``) at Spatial-Mamba-T's four stage shapes (224x224, batch 8).

    .venv/bin/python benchmarks/fusion_cpu.py [--batch 8] [--rounds 7] [--threads N] [--ops state_fusion ...]
        [--out results/fusion_cpu.json]

For each stage, op (``state_fusion``: fn(h, taps); ``fused_observation``: fn(h, taps, C, u, D); ``selective_scan``:
fn(u, delta, A, B, delta_bias, softplus) over the stage's H x W tokens, d_state 1) and pass (forward under no_grad;
forward + backward with every input requiring its gradient), three variants are timed in interleaved rounds
(reference, cpu, cpu token-major, reference, ...), so that a load that comes and goes on a shared machine reaches
all: the reference backend and the compiled kernels on contiguous (B, C, ...) states, and the compiled kernels on
token-major ones (views of (B, ..., C) memory, the layout the model hands them on the CPU; the upstream gradient in
the same layout). The table gives each variant's median over the rounds and the ratios reference / cpu and
cpu / cpu token-major of the medians.
The load average before and after is printed and stored. float32, the model's ranges do not matter to the time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

import torch

from spatial_mamba.ops import backend

# (d_inner, height = width): Spatial-Mamba-T at 224x224 (the official ``spatialmamba_tiny`` config).
STAGES = ((128, 56), (256, 28), (512, 14), (1024, 7))
# name: (backend, token-major states)
VARIANTS = {"reference": ("reference", False), "cpu": ("cpu", False), "cpu token-major": ("cpu", True)}
OPS = ("state_fusion", "fused_observation", "selective_scan")
PASSES = ("forward", "forward+backward")


def make_inputs(op: str, batch: int, channels: int, side: int, grad: bool, token_major: bool = False):
    """The op's inputs; with ``token_major``, its (B, C, ...) states (h and u, or u and delta) in that layout."""
    tensors = _inputs(op, batch, channels, side)
    states = (0, 1) if op == "selective_scan" else (0, 3)
    tensors = [backend.as_layout(t, token_major) if i in states else t for i, t in enumerate(tensors)]
    return [t.requires_grad_(grad) for t in tensors]


def _inputs(op: str, batch: int, channels: int, side: int):
    gen = torch.Generator().manual_seed(0)
    if op == "selective_scan":
        length = side * side
        tensors = [
            torch.randn(batch, channels, length, generator=gen),
            torch.randn(batch, channels, length, generator=gen) - 3.0,
            -torch.rand(channels, 1, generator=gen) * 3.5 - 0.5,
            torch.randn(batch, 1, length, generator=gen),
            torch.rand(channels, generator=gen) - 4.0,
        ]
        return tensors
    h = torch.randn(batch, channels, side, side, generator=gen)
    taps = torch.randn(channels, 25, generator=gen) / 5
    tensors = [h, taps]
    if op == "fused_observation":
        tensors += [
            torch.randn(batch, side, side, generator=gen),
            torch.randn(batch, channels, side, side, generator=gen),
            torch.rand(channels, generator=gen),
        ]
    return tensors


def step(op: str, name: str, tensors, grad: bool, dy):
    with backend.force(name, op):
        fn = backend.select(op, *tensors)
    args = (*tensors, True) if op == "selective_scan" else tensors  # the scan with its softplus, as in the model
    if not grad:
        with torch.no_grad():
            fn(*args)
        return
    for t in tensors:
        t.grad = None
    out = fn(*args)
    out.backward(dy.reshape(out.shape))  # the scan's hs is (B, C, 1, H * W)


def time_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per case (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="the ops to time (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ok, why = backend.is_available(args.ops[0], "cpu")
    if not ok:
        raise SystemExit(f"the cpu backend is unavailable: {why}")
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.rounds} rounds")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}")
    header = (
        f"{'op':<18} {'pass':<17} {'D':>5} {'HxW':>6}  {'reference ms':>12} {'cpu ms':>8} {'token-major ms':>14}"
        f" {'ref/cpu':>7} {'cpu/token':>9}"
    )
    print(header)
    print("-" * len(header))
    results = []
    for op in args.ops:
        for pass_name in PASSES:
            grad = pass_name != "forward"
            for channels, side in STAGES:
                inputs = {}
                for name, (_, tokens) in VARIANTS.items():
                    dy = backend.as_layout(torch.randn(args.batch, channels, side, side), tokens)
                    inputs[name] = dict(tensors=make_inputs(op, args.batch, channels, side, grad, tokens), dy=dy)
                run = {
                    name: functools.partial(step, op, which, grad=grad, **inputs[name])
                    for name, (which, _) in VARIANTS.items()
                }
                times = {name: [] for name in VARIANTS}
                for name in VARIANTS:  # warm-up (and the first call's compile of the kernels)
                    run[name]()
                for _ in range(args.rounds):
                    for name in VARIANTS:
                        times[name].append(time_ms(run[name]))
                medians = {name: statistics.median(values) for name, values in times.items()}
                ratio = medians["reference"] / medians["cpu"]
                layout_ratio = medians["cpu"] / medians["cpu token-major"]
                results.append(
                    {
                        "op": op,
                        "pass": pass_name,
                        "shape": [args.batch, channels, side, side],
                        "median_ms": medians,
                        "times_ms": times,
                        "ratio_reference_to_cpu": ratio,
                        "ratio_cpu_to_token_major": layout_ratio,
                    }
                )
                print(
                    f"{op:<18} {pass_name:<17} {channels:>5} {f'{side}x{side}':>6}  "
                    f"{medians['reference']:>12.2f} {medians['cpu']:>8.2f} {medians['cpu token-major']:>14.2f}"
                    f" {ratio:>6.2f}x {layout_ratio:>8.2f}x"
                )
    load_after = os.getloadavg()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in load_after)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "batch": args.batch,
            "rounds": args.rounds,
            "cpu_backend": why,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "results": results,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
