"""CPU micro-benchmark of the replicate-padding adjoint in the backward of ``depthwise_conv2d_replicate``.

    .venv/bin/python benchmarks/dwconv_cpu.py [--batch 8] [--repeats 7] [--threads N] [--out FILE.json]

At the state fusion's shapes in Spatial-Mamba-T at 224x224 (one 11x11 depthwise convolution, padding 5, over
d_inner channels at each stage's grid) it times, interleaved in one process (A, B, A, B, ...), the two ways of
folding the padded input gradient back onto x:

- ``aten``: ``torch.ops.aten.replication_pad2d_backward``, what eager calls use;
- ``slices``: ``_replicate_pad_adjoint`` (border sums and a concatenation), what torch.compile traces (and fuses).

and the whole input-plus-weight backward of the convolution with the current implementation, for scale. Prints the
best and median wall-clock ms of ``repeats`` calls of each (not the process's CPU time: idle OpenMP threads
spin after each parallel region and would be charged to the next call); ``--out`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from spatial_mamba.ops.dwconv2d import _replicate_pad_adjoint, depthwise_conv2d_replicate

# (d_inner, grid side, blocks): Spatial-Mamba-T at 224x224 (the official ``spatialmamba_tiny`` config).
STAGES = ((128, 56, 2), (256, 28, 4), (512, 14, 8), (1024, 7, 4))
PAD = 5  # the state fusion's 11x11 kernel


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write the figures to")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'C':>5} {'HxW':>6}  {'aten ms (best/median)':>22}  {'slices ms (best/median)':>24}  conv backward ms")
    rows = []
    for channels, side, blocks in STAGES:
        x = torch.randn(args.batch, channels, side, side)
        grad_padded = torch.randn(args.batch, channels, side + 2 * PAD, side + 2 * PAD)
        weight = torch.randn(channels, 1, 2 * PAD + 1, 2 * PAD + 1, requires_grad=True)
        x_leaf = x.clone().requires_grad_()
        out = depthwise_conv2d_replicate(x_leaf, weight)
        grad_out = torch.randn_like(out)

        fns = {
            "aten": functools.partial(torch.ops.aten.replication_pad2d_backward, grad_padded, x, [PAD] * 4),
            "slices": functools.partial(_replicate_pad_adjoint, grad_padded, PAD, side, side),
            "conv_backward": functools.partial(torch.autograd.grad, out, (x_leaf, weight), grad_out, retain_graph=True),
        }
        times = {name: [] for name in fns}
        for fn in fns.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in fns.items():
                times[name].append(_time(fn))
        row = {"channels": channels, "side": side, "blocks": blocks, "batch": args.batch}
        for name, values in times.items():
            row[f"{name}_ms_best"], row[f"{name}_ms_median"] = min(values), statistics.median(values)
        rows.append(row)
        a, s = (f"{row[f'{n}_ms_best']:>9.3f} / {row[f'{n}_ms_median']:>9.3f}" for n in ("aten", "slices"))
        print(f"{channels:>5} {side:>3}x{side:<3} {a:>22}  {s:>24}  {row['conv_backward_ms_median']:>10.2f}")
    for name in ("aten", "slices"):
        total = sum(r["blocks"] * r[f"{name}_ms_median"] for r in rows)
        print(f"{name}: {total:.1f} ms over the 18 blocks of Spatial-Mamba-T (medians)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "pad": PAD}
        args.out.write_text(json.dumps({"meta": meta, "stages": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
