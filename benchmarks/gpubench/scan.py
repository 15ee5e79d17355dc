"""The selective scan section: ``scan_forward`` and ``scan_backward`` on every backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import torch

from spatial_mamba.models.ssm import dt_bias_init
from spatial_mamba.ops import backend

from .backends import backend_impl
from .checks import difference_error, judge_difference, relative_max_diff
from .device import bandwidth_figures
from .timing import leaves, pass_step

if TYPE_CHECKING:
    from .report import Run

FP32_BYTES = 4
DIRECTIONS = ("forward", "backward")
SCAN_BYTES_DEFINITION = (
    "Bytes that must move between DRAM and the chip, each tensor once. Forward: read u, delta (batch*D*L, input "
    "dtype), B (batch*N*L, input dtype), A (D*N fp32), delta_bias (D fp32); write hs (batch*D*N*L fp32). Backward: "
    "read u, delta, B, A, delta_bias, hs and dhs (both batch*D*N*L fp32); write du, ddelta, dB (input dtype), dA "
    "(D*N fp32) and ddelta_bias (D fp32). gb_per_s = bytes / time / 1e9; fraction_of_peak_bandwidth = bytes / time "
    "/ the device's peak DRAM bandwidth."
)


def scan_bytes(
    batch: int, channels: int, length: int, d_state: int, input_bytes: int, backward: bool
) -> Dict[str, int]:
    """The bytes the scan must move, per tensor (``SCAN_BYTES_DEFINITION``); keys are "read x" / "write y"."""
    tokens = batch * channels * length
    inputs = {
        "u": tokens * input_bytes,
        "delta": tokens * input_bytes,
        "B": batch * d_state * length * input_bytes,
        "A": channels * d_state * FP32_BYTES,
        "delta_bias": channels * FP32_BYTES,
    }
    states = tokens * d_state * FP32_BYTES
    terms = {f"read {name}": size for name, size in inputs.items()}
    if not backward:
        terms["write hs"] = states
        return terms
    terms["read hs"] = states
    terms["read dhs"] = states
    # The gradients have their inputs' dtypes and shapes.
    terms.update({f"write d{name}": size for name, size in inputs.items()})
    return terms


def scan_inputs(run: Run) -> Tuple[Tuple[torch.Tensor, ...], torch.Tensor]:
    """(u, delta, A, B, delta_bias), dhs in the model's ranges: A = -exp(log 1) (the official A_log init),
    delta_bias as the model initialises it (``dt_bias_init``: the inverse softplus of dt, log-uniform in
    [1e-3, 0.1]); u, delta, B in bfloat16 as under AMP."""
    batch, channels, length, device = run.batch_size, run.channels, run.side * run.side, run.device
    u = torch.randn(batch, channels, length, device=device, dtype=torch.bfloat16)
    delta = (0.5 * torch.randn(batch, channels, length, device=device)).to(torch.bfloat16)
    A = -torch.ones(channels, run.d_state, device=device)
    B = torch.randn(batch, run.d_state, length, device=device, dtype=torch.bfloat16)
    delta_bias = dt_bias_init(channels, dt_min=1e-3, dt_max=0.1).to(device)
    dhs = torch.randn(batch, channels, run.d_state, length, device=device)
    return (u, delta, A, B, delta_bias), dhs


def bench_scan(run: Run):
    length = run.side * run.side
    shape = {"batch": run.batch_size, "channels": run.channels, "height": run.side, "width": run.side}
    shape.update(length=length, d_state=run.d_state)
    inputs, dhs = scan_inputs(run)
    sections = {}
    for direction in DIRECTIONS:
        terms = scan_bytes(run.batch_size, run.channels, length, run.d_state, 2, backward=direction == "backward")
        sections[direction] = {
            "shape": shape,
            "input_dtype": "bfloat16",
            "delta_softplus": True,
            "delta_bias": True,
            "bytes_definition": SCAN_BYTES_DEFINITION,
            "bytes_moved": {"total": sum(terms.values()), "terms": terms},
            "backends": {},
        }
        run.results[f"scan_{direction}"] = sections[direction]

    expected: Dict[str, List[torch.Tensor]] = {}
    try:
        # The reference backend in float64: every backend, the float32 reference included, is checked against it.
        reference, _ = backend_impl("selective_scan", "reference", *inputs)
        exact = leaves(t.double() for t in inputs)
        hs = reference(*exact, True)
        expected["backward"] = list(torch.autograd.grad(hs, exact, dhs.double()))
        expected["forward"] = [hs.detach()]
        del hs, exact
    except Exception as error:
        run.failed("scan (reference outputs for the checks)", error)

    for name in backend.CUDA_ORDER:
        impl, why = backend_impl("selective_scan", name, *inputs)
        for direction in DIRECTIONS:
            entry: Dict[str, object] = {"available": impl is not None}
            if impl is None:
                entry["reason"] = why
            elif run.over_budget():
                entry.update(run.skipped())
            else:
                try:
                    entry.update(_time_scan(run, impl, inputs, dhs, direction, expected.get(direction)))
                    entry.update(judge_difference(entry["max_rel_diff_vs_reference"], _check_dtype(direction)))
                    if entry["check_pass"] is False:
                        run.failed(f"scan {direction} ({name})", difference_error(entry))
                    fraction = entry["fraction_of_peak_bandwidth"]
                    run.log(
                        f"scan {direction:<8} {name:<9} {entry['ms']:9.3f} ms  {entry['gb_per_s']:8.1f} GB/s  "
                        + ("" if fraction is None else f"{100 * fraction:5.1f}% of peak")
                    )
                except Exception as error:
                    entry.update(run.failed(f"scan {direction} ({name})", error))
                run.free_memory()
            sections[direction]["backends"][name] = entry
        run.save()


def _check_dtype(direction: str) -> str:
    # hs is float32; the backward returns du, ddelta and dB in the inputs' bfloat16.
    return "float32" if direction == "forward" else "bfloat16"


def _time_scan(run: Run, impl, inputs, dhs, direction: str, expected: Sequence | None) -> Dict[str, object]:
    """Times the scan forward (without autograd) or backward (autograd.grad of one retained forward)."""
    section = run.results[f"scan_{direction}"]
    step = pass_step(direction, lambda *tensors: impl(*tensors, True), inputs, dhs)
    check = None if expected is None else relative_max_diff(step(), expected)
    timing = run.time(step, "kernel")
    return {
        **timing,
        **bandwidth_figures(section["bytes_moved"]["total"], timing["ms"], run.peak),
        "max_rel_diff_vs_reference": check,
    }
