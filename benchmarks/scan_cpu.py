"""CPU micro-benchmark of the reference selective scan at Spatial-Mamba-T's four stage shapes (224x224, batch 8).

    .venv/bin/python benchmarks/scan_cpu.py [--batch 8] [--repeats 5] [--threads N]

Prints the best-of-``repeats`` forward and forward+backward times in ms per stage, and the total over the 18 blocks
of T (2, 4, 8, 4 blocks per stage): wall-clock, and the process's CPU time (summed over threads), which is the steadier
number on a shared machine. Inputs follow the model: float32 u, delta, B; A = -1 (d_state 1); delta_bias as the model
initialises it (``dt_bias_init``: the inverse softplus of dt, log-uniform in [0.001, 0.1]); softplus on.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from spatial_mamba.models.ssm import dt_bias_init
from spatial_mamba.ops.selective_scan import selective_scan_ref

# (Dn, L, blocks): Spatial-Mamba-T at 224x224 (the official ``spatialmamba_tiny`` config).
STAGES = ((128, 3136, 2), (256, 784, 4), (512, 196, 8), (1024, 49, 4))


def best_ms(fn, repeats: int):
    """(wall, cpu): the smallest wall-clock and process CPU times of ``repeats`` calls, in ms."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return 1e3 * min(wall), 1e3 * min(cpu)


def forward(inputs):
    with torch.no_grad():
        selective_scan_ref(*inputs)


def forward_backward(inputs, dhs):
    selective_scan_ref(*inputs).backward(dhs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'Dn':>5} {'L':>5} {'blocks':>6}  fwd ms (wall / cpu)  fwd+bwd ms (wall / cpu)")
    totals = [0.0] * 4
    for channels, length, blocks in STAGES:
        u = torch.randn(args.batch, channels, length, requires_grad=True)
        delta = torch.randn(args.batch, channels, length).mul_(0.1).requires_grad_()
        A = torch.full((channels, 1), -1.0, requires_grad=True)
        B = torch.randn(args.batch, 1, length, requires_grad=True)
        delta_bias = dt_bias_init(channels, dt_min=0.001, dt_max=0.1).requires_grad_()
        dhs = torch.randn(args.batch, channels, 1, length)

        inputs = (u, delta, A, B, delta_bias, True)
        fwd = best_ms(functools.partial(forward, inputs), args.repeats)
        both = best_ms(functools.partial(forward_backward, inputs, dhs), args.repeats)
        times = (*fwd, *both)
        totals = [total + blocks * t for total, t in zip(totals, times)]
        fwd_text, both_text = f"{times[0]:>8.1f} / {times[1]:>6.1f}", f"{times[2]:>12.1f} / {times[3]:>6.1f}"
        print(f"{channels:>5} {length:>5} {blocks:>6}  {fwd_text}  {both_text}")
    print(
        f"Spatial-Mamba-T, 18 blocks: fwd {totals[0]:.0f} ms wall / {totals[1]:.0f} ms cpu, "
        f"fwd+bwd {totals[2]:.0f} ms wall / {totals[3]:.0f} ms cpu"
    )


if __name__ == "__main__":
    main()
