"""GPU benchmark of Spatial-Mamba: the scan and state-fusion kernels, and model throughput against Swin and ConvNeXt.

    python benchmarks/gpu.py [--out DIR] [--only scan,fusion,models] [--models a,b,...] [--batch-size 128]
                             [--img-size 224] [--iters N] [--warmup N] [--profile] [--smoke] [--time-budget 540]

Writes ``<out>/<gpu>.json`` (``h100.json``, ``h200.json``, ...; ``<gpu>-smoke.json`` with ``--smoke``) after every
measurement, so an interrupted run keeps what it measured, and prints a table at the end. ``benchmarks/README.md``
explains each figure, how the bytes behind the bandwidth figures are counted, and how to run this on a lent GPU.
Exits with status 1 when a measurement failed for a reason other than running out of GPU memory.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from torch.autograd import DeviceType

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # `python benchmarks/gpu.py` puts benchmarks/ on the path, not the repository, and the lent GPU machine runs the
    # working tree without installing the package.
    sys.path.insert(0, str(ROOT))

import spatial_mamba  # noqa: E402, F401  (registers spatial_mamba_* with timm)
from spatial_mamba.ops import backend  # noqa: E402
from spatial_mamba.ops.state_fusion import (  # noqa: E402
    DILATIONS,
    fusion_taps,
    merge_state_fusion_kernels,
    state_fusion,
)

FP32_BYTES = 4
SECTIONS = ("scan", "fusion", "models")
DEFAULT_MODELS = (
    "spatial_mamba_tiny",
    "spatial_mamba_small",
    "spatial_mamba_base",
    "swin_tiny_patch4_window7_224",
    "swin_small_patch4_window7_224",
    "swin_base_patch4_window7_224",
    "convnext_tiny",
)
SMOKE_MODELS = ("spatial_mamba_tiny", "swin_tiny_patch4_window7_224")
# Each Spatial-Mamba variant against the Swin of its size (the paper's comparison).
THROUGHPUT_PAIRS = (
    ("spatial_mamba_tiny", "swin_tiny_patch4_window7_224"),
    ("spatial_mamba_small", "swin_small_patch4_window7_224"),
    ("spatial_mamba_base", "swin_base_patch4_window7_224"),
)
PROFILED_MODEL = "spatial_mamba_tiny"
PROFILE_TOP = 25
NUM_CLASSES = 1000

# Targets of the GPU validation issue.
SCAN_FORWARD_MIN_FRACTION = 0.80
SCAN_BACKWARD_MIN_FRACTION = 0.60
FUSION_MIN_SPEEDUP = 2.0
THROUGHPUT_MIN_RATIO = 1.0

# Peak DRAM bandwidth in bytes/s from NVIDIA's datasheets: (label, words that all start somewhere in the upper-cased
# device name, bandwidth, file name). The first matching row wins; torch reports the H100 SXM as "NVIDIA H100 80GB
# HBM3". A word must not follow a letter or digit, so a GH200 is not taken for an H200.
PEAK_BANDWIDTH = (
    ("H200", ("H200",), 4.8e12, "h200"),
    ("H100 PCIe", ("H100", "PCIE"), 2.0e12, "h100-pcie"),
    ("H100 SXM", ("H100", "HBM3"), 3.35e12, "h100"),
    ("H100 SXM", ("H100", "SXM"), 3.35e12, "h100"),
    ("A100 80GB PCIe", ("A100", "80GB", "PCIE"), 1.935e12, "a100-80gb-pcie"),
    ("A100 80GB", ("A100", "80GB"), 2.039e12, "a100-80gb"),
    ("A100 40GB", ("A100", "40GB"), 1.555e12, "a100-40gb"),
)

SCAN_BYTES_DEFINITION = (
    "Bytes that must move between DRAM and the chip, each tensor once. Forward: read u, delta (batch*D*L, input "
    "dtype), B (batch*N*L, input dtype), A (D*N fp32), delta_bias (D fp32); write hs (batch*D*N*L fp32). Backward: "
    "read u, delta, B, A, delta_bias, hs and dhs (both batch*D*N*L fp32); write du, ddelta, dB (input dtype), dA "
    "(D*N fp32) and ddelta_bias (D fp32). gb_per_s = bytes / time / 1e9; fraction_of_peak_bandwidth = bytes / time "
    "/ the device's peak DRAM bandwidth."
)
FUSION_BASELINE_DEFINITION = (
    "The same state fusion written with PyTorch: for each branch F.pad(h, mode='replicate') then a depthwise "
    "F.conv2d, alpha folded into the kernels, branches summed; the eval path's merged 11x11 kernel from "
    "merge_state_fusion_kernels. On CUDA, F.conv2d runs PyTorch's native depthwise kernels here, not cuDNN: PyTorch "
    "sends fp32 NCHW and every dilated depthwise convolution to them. speedup_vs_baseline = baseline ms / backend "
    "ms. 'fused' rows time the one-pass 25-tap state_fusion op (taps built from the kernels and alpha in the step)."
)
# Largest max|actual - expected| / max|expected| a backend may show against the float64 reference (scan) or the
# float32 PyTorch baseline (fusion): fp32 results carry atol 2e-5 of the maximum (tests/kernels/parity.py) and
# the fusion sums 25 fp32 terms in another order; 16-bit gradients add one rounding (one bfloat16 ulp, 2**-7).
CHECK_MAX_REL_DIFF = {"float32": 1e-4, "bfloat16": 2.0**-7 + 1e-4}


def log(message: str, start: float):
    print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)


# --- bytes, bandwidth and device names ---------------------------------------------------------------------------


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


def peak_bandwidth(device_name: str) -> Tuple[float | None, str, str]:
    """(peak DRAM bandwidth in bytes/s or None, how it was found, file name stem) for a CUDA device name."""
    upper = device_name.upper()
    stem = re.sub(r"[^a-z0-9]+", "-", device_name.lower().replace("nvidia", "")).strip("-") or "gpu"
    if "MIG" in upper:
        return None, f"{device_name!r} is a MIG slice: its share of the GPU's bandwidth is unknown", stem
    for label, words, bandwidth, name in PEAK_BANDWIDTH:
        if all(re.search(rf"(?<![A-Z0-9]){word}", upper) for word in words):
            return bandwidth, f"datasheet figure for the {label}", name
    return None, f"{device_name!r} is not in the peak bandwidth table of benchmarks/gpu.py", stem


def bandwidth_figures(total_bytes: int, ms: float, peak: float | None) -> Dict[str, float | None]:
    bytes_per_s = total_bytes / (ms * 1e-3)
    return {"gb_per_s": bytes_per_s / 1e9, "fraction_of_peak_bandwidth": None if peak is None else bytes_per_s / peak}


# --- timing ------------------------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], warmup: int, iters: int, device: torch.device) -> Dict[str, float]:
    """Runs ``fn`` ``warmup`` times, then times ``iters`` calls one by one: CUDA events on a GPU, the wall clock on
    the CPU. Returns the median and minimum in ms."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "iters": iters, "warmup": warmup}


def relative_max_diff(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """max over the pairs of max|actual - expected| / max|expected|: a sanity check that a fast kernel computes
    the same function as the reference it is compared with."""
    worst = 0.0
    for a, e in zip(actual, expected):
        e = e.float()
        scale = e.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
        worst = max(worst, ((a.float() - e).abs().max() / scale).item())
    return worst


def forced_backend(name: str):
    """Forces every op onto backend ``name`` (``backend.force``)."""
    return backend.force(name)


def backend_impl(op: str, name: str, *probe) -> Tuple[Callable | None, str]:
    """(implementation, "") of ``op`` on backend ``name`` for inputs like ``probe``, or (None, why it cannot run)."""
    with forced_backend(name):
        try:
            return backend.choose(op, *probe)[1], ""
        except (RuntimeError, KeyError) as error:
            return None, str(error)


def judge_difference(diff: float | None, dtype: str) -> Dict[str, object]:
    """The check of a backend's result: its max relative difference, the threshold for ``dtype``, and the verdict."""
    threshold = CHECK_MAX_REL_DIFF[dtype]
    return {"check_threshold": threshold, "check_pass": None if diff is None else bool(diff <= threshold)}


# --- the run -----------------------------------------------------------------------------------------------------


class Run:
    """Settings, results and bookkeeping of one benchmark run; ``save`` rewrites the JSON file."""

    def __init__(self, args: argparse.Namespace):
        self.start = time.perf_counter()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        small = args.smoke
        self.batch_size = args.batch_size or (2 if small else 128)
        self.img_size = args.img_size or (32 if small else 224)
        # Kernel shapes: Spatial-Mamba-T's first stage at 224x224 (d_inner 128, 56x56 tokens, N 1).
        self.channels = 16 if small else 128
        self.side = 32 if small else 56
        self.d_state = 1
        self.kernel_warmup = args.warmup if args.warmup is not None else (1 if small else 20)
        self.kernel_iters = args.iters or (2 if small else 50)
        self.model_warmup = args.warmup if args.warmup is not None else (1 if small else 10)
        self.model_iters = args.iters or (2 if small else 30)
        self.models = args.models or (SMOKE_MODELS if small else DEFAULT_MODELS)
        self.sections = args.only
        self.time_budget = args.time_budget if args.time_budget is not None else (0 if small else 540)
        self.errors: List[Dict[str, object]] = []

        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            self.peak, peak_note, stem = peak_bandwidth(name)
        else:
            name = platform.processor() or platform.machine() or "cpu"
            self.peak, peak_note, stem = None, "no peak bandwidth figure for a CPU", "cpu"
        self.path = Path(args.out) / f"{stem}{'-smoke' if small else ''}.json"
        self.results: Dict[str, object] = {
            "device": name,
            "device_type": self.device.type,
            "peak_bandwidth_bytes_per_s": self.peak,
            "peak_bandwidth_note": peak_note,
            "peak_bandwidth_from_device_properties_bytes_per_s": _bandwidth_from_properties(self.device),
            "torch": torch.__version__,
            "triton": _triton_version(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if self.device.type == "cuda" else None,
            "timm": timm.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": _git_commit(),
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
            "smoke": small,
            "settings": {
                "batch_size": self.batch_size,
                "img_size": self.img_size,
                "kernel_warmup": self.kernel_warmup,
                "kernel_iters": self.kernel_iters,
                "model_warmup": self.model_warmup,
                "model_iters": self.model_iters,
                "time_budget_s": self.time_budget,
                "cudnn_benchmark": True,
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            },
            "backends": self._backends(),
        }

    def _backends(self) -> Dict[str, Dict[str, object]]:
        """For each op: the backend the model runs on this device (``default``) and every backend's status."""
        probe = torch.zeros(1, device=self.device)
        status = backend.describe()
        report = {}
        for op in ("selective_scan", "dwconv2d"):
            try:
                default, note = backend.choose(op, probe)[0], None
            except RuntimeError as error:  # SPATIAL_MAMBA_BACKEND forces a backend that cannot run here
                default, note = None, str(error)
            report[op] = {"default": default, "default_note": note, "status": status.get(op, {})}
        return report

    def log(self, message: str):
        log(message, self.start)

    def over_budget(self) -> bool:
        return self.time_budget > 0 and time.perf_counter() - self.start > self.time_budget

    def skipped(self) -> Dict[str, str]:
        return {"skipped": f"the time budget of {self.time_budget} s (--time-budget) ran out before this started"}

    def failed(self, where: str, error: BaseException) -> Dict[str, object]:
        """Records a failed measurement (printed with its traceback, never silent) and returns its result entry."""
        oom = isinstance(error, torch.cuda.OutOfMemoryError)
        self.log(f"{where}: {'out of memory' if oom else 'FAILED'}: {error}")
        if not oom:
            traceback.print_exc()
        self.errors.append({"where": where, "error": f"{type(error).__name__}: {error}", "out_of_memory": oom})
        return {"error": f"{type(error).__name__}: {error}", "out_of_memory": oom}

    def free_memory(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def save(self):
        self.results["errors"] = self.errors
        self.results["targets"] = evaluate_targets(self.results)
        self.results["elapsed_s"] = time.perf_counter() - self.start
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=2) + "\n")
        tmp.replace(self.path)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _bandwidth_from_properties(device: torch.device) -> float | None:
    """2 x memory clock x bus width, when torch reports them: a cross-check of the datasheet table."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8


# --- the selective scan ------------------------------------------------------------------------------------------


def scan_inputs(run: Run):
    """(u, delta, A, B, delta_bias), dhs in the model's ranges: A = -exp(log 1) (the official A_log init),
    delta_bias the inverse softplus of dt log-uniform in [1e-3, 0.1]; u, delta, B in bfloat16 as under AMP."""
    batch, channels, length, device = run.batch_size, run.channels, run.side * run.side, run.device
    u = torch.randn(batch, channels, length, device=device, dtype=torch.bfloat16)
    delta = (0.5 * torch.randn(batch, channels, length, device=device)).to(torch.bfloat16)
    A = -torch.ones(channels, run.d_state, device=device)
    B = torch.randn(batch, run.d_state, length, device=device, dtype=torch.bfloat16)
    dt = torch.exp(torch.empty(channels, device=device).uniform_(math.log(1e-3), math.log(0.1)))
    delta_bias = dt + torch.log(-torch.expm1(-dt))
    dhs = torch.randn(batch, channels, run.d_state, length, device=device)
    return (u, delta, A, B, delta_bias), dhs


def bench_scan(run: Run):
    length = run.side * run.side
    shape = {"batch": run.batch_size, "channels": run.channels, "height": run.side, "width": run.side}
    shape.update(length=length, d_state=run.d_state)
    inputs, dhs = scan_inputs(run)
    sections = {}
    for direction in ("forward", "backward"):
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

    expected = {}
    try:
        # The reference backend in float64: every backend, the float32 reference included, is checked against it.
        reference, _ = backend_impl("selective_scan", "reference", *inputs)
        leaves = _leaves(t.double() for t in inputs)
        hs = reference(*leaves, True)
        expected["backward"] = torch.autograd.grad(hs, leaves, dhs.double())
        expected["forward"] = [hs.detach()]
        del hs, leaves
    except Exception as error:
        run.failed("scan (reference outputs for the checks)", error)

    for name in backend.BACKENDS:
        impl, why = backend_impl("selective_scan", name, *inputs)
        for direction in ("forward", "backward"):
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
                        run.failed(f"scan {direction} ({name})", _difference_error(entry))
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


def _difference_error(entry: Dict[str, object]) -> ValueError:
    diff = entry.get("max_rel_diff_vs_reference", entry.get("max_rel_diff_vs_baseline"))
    return ValueError(f"result differs by {diff!r} of its maximum, above the threshold {entry['check_threshold']!r}")


def _leaves(tensors: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def _time_scan(run: Run, impl, inputs, dhs, direction: str, expected: Sequence | None) -> Dict[str, object]:
    """Times the scan forward (without autograd) or backward (autograd.grad of one retained forward)."""
    section = run.results[f"scan_{direction}"]
    if direction == "forward":

        def step():
            with torch.no_grad():
                return [impl(*inputs, True)]

    else:
        leaves = _leaves(inputs)
        hs = impl(*leaves, True)

        def step():
            return torch.autograd.grad(hs, leaves, dhs, retain_graph=True)

    check = None if expected is None else relative_max_diff(step(), expected)
    timing = time_ms(step, run.kernel_warmup, run.kernel_iters, run.device)
    return {
        **timing,
        **bandwidth_figures(section["bytes_moved"]["total"], timing["ms"], run.peak),
        "max_rel_diff_vs_reference": check,
    }


# --- the state fusion --------------------------------------------------------------------------------------------


def native_state_fusion(h, kernel_3, kernel_3_1, kernel_3_2, alpha, merged: bool) -> torch.Tensor:
    """The baseline (``FUSION_BASELINE_DEFINITION``): replicate padding and a depthwise F.conv2d per branch."""
    if merged:
        branches = [(merge_state_fusion_kernels(kernel_3, kernel_3_1, kernel_3_2, alpha), 1)]
    else:
        branches = [(alpha[i] * k, d) for i, (k, d) in enumerate(zip((kernel_3, kernel_3_1, kernel_3_2), DILATIONS))]
    out = None
    for weight, dilation in branches:
        pad = dilation * (weight.shape[-1] // 2)
        branch = F.conv2d(F.pad(h, (pad,) * 4, mode="replicate"), weight, dilation=dilation, groups=h.shape[1])
        out = branch if out is None else out + branch
    return out


def bench_fusion(run: Run):
    shape = {"batch": run.batch_size, "channels": run.channels, "height": run.side, "width": run.side}
    # float32 states, as the scan returns them and the model fuses them (paper Eq. 4), without autocast.
    h = torch.randn(run.batch_size, run.channels, run.side, run.side, device=run.device)
    params = [0.1 * torch.randn(run.channels, 1, 3, 3, device=run.device) for _ in range(3)]
    params.append(torch.rand(3, device=run.device) + 0.5)
    dy = torch.randn_like(h)
    paths = {
        "train": "three replicate-padded depthwise 3x3 convolutions at dilations 1, 3, 5 (model.train())",
        "eval": "one replicate-padded depthwise 11x11 convolution with the merged kernel (model.eval())",
    }
    for direction in ("forward", "backward"):
        run.results[f"fusion_{direction}"] = {
            "shape": shape,
            "dtype": "float32",
            "baseline_definition": FUSION_BASELINE_DEFINITION,
            **{path: {"description": text, "baseline": None, "backends": {}} for path, text in paths.items()},
        }

    fused: Dict[str, Dict[str, object]] = {}
    for path in paths:
        merged = path == "eval"
        expected = {}
        for direction in ("forward", "backward"):
            section = run.results[f"fusion_{direction}"][path]
            try:
                fn = _fusion_step(native_state_fusion, h, params, dy, merged, direction)
                expected[direction] = fn()
                section["baseline"] = time_ms(fn, run.kernel_warmup, run.kernel_iters, run.device)
                run.log(f"fusion {direction:<8} {path:<5} baseline  {section['baseline']['ms']:9.3f} ms")
            except Exception as error:
                section["baseline"] = run.failed(f"fusion {direction} {path} (baseline)", error)
            run.free_memory()

        for name in backend.BACKENDS:
            impl, why = backend_impl("dwconv2d", name, h, params[0])
            for direction in ("forward", "backward"):
                section = run.results[f"fusion_{direction}"][path]
                entry: Dict[str, object] = {"available": impl is not None}
                if impl is None:
                    entry["reason"] = why
                elif run.over_budget():
                    entry.update(run.skipped())
                else:
                    try:
                        with forced_backend(name):
                            fn = _fusion_step(official_path_state_fusion, h, params, dy, merged, direction)
                            check = fn()
                            timing = time_ms(fn, run.kernel_warmup, run.kernel_iters, run.device)
                        entry.update(timing)
                        if direction in expected:
                            entry["max_rel_diff_vs_baseline"] = relative_max_diff(check, expected[direction])
                            entry.update(judge_difference(entry["max_rel_diff_vs_baseline"], "float32"))
                            if entry["check_pass"] is False:
                                run.failed(f"fusion {direction} {path} ({name})", _difference_error(entry))
                        baseline_ms = (section["baseline"] or {}).get("ms")
                        entry["speedup_vs_baseline"] = None if baseline_ms is None else baseline_ms / timing["ms"]
                        speedup = entry["speedup_vs_baseline"]
                        run.log(
                            f"fusion {direction:<8} {path:<5} {name:<9} {timing['ms']:9.3f} ms"
                            + ("" if speedup is None else f"  {speedup:5.2f}x baseline")
                        )
                    except Exception as error:
                        entry.update(run.failed(f"fusion {direction} {path} ({name})", error))
                    run.free_memory()
                section["backends"][name] = entry
            run.save()

        for direction in ("forward", "backward"):
            section = run.results[f"fusion_{direction}"][path]
            section["fused"] = fused.get(direction) if fused.get(direction) else {}
            if fused.get(direction):
                continue  # the same op serves both paths: measured once
            for name in backend.BACKENDS:
                section["fused"][name] = _time_fused(run, name, h, params, dy, direction, expected, section)
            fused[direction] = section["fused"]
            run.save()


def _time_fused(run: Run, name: str, h, params, dy, direction: str, expected, section) -> Dict[str, object]:
    """Times the one-pass state_fusion op on backend ``name`` against the same baseline as the other rows."""
    impl, why = backend_impl("state_fusion", name, h, fusion_taps(*params))
    entry: Dict[str, object] = {"available": impl is not None}
    if impl is None:
        entry["reason"] = why
        return entry
    if run.over_budget():
        entry.update(run.skipped())
        return entry
    try:

        def fusion(h, *params, merged):
            return impl(h, fusion_taps(*params))

        fn = _fusion_step(fusion, h, params, dy, False, direction)
        check = fn()
        timing = time_ms(fn, run.kernel_warmup, run.kernel_iters, run.device)
        entry.update(timing)
        if direction in expected:
            entry["max_rel_diff_vs_baseline"] = relative_max_diff(check, expected[direction])
            entry.update(judge_difference(entry["max_rel_diff_vs_baseline"], "float32"))
            if entry["check_pass"] is False:
                run.failed(f"fusion {direction} fused ({name})", _difference_error(entry))
        baseline_ms = (section["baseline"] or {}).get("ms")
        entry["speedup_vs_baseline"] = None if baseline_ms is None else baseline_ms / timing["ms"]
        run.log(f"fusion {direction:<8} fused {name:<9} {timing['ms']:9.3f} ms")
    except Exception as error:
        entry.update(run.failed(f"fusion {direction} fused ({name})", error))
    run.free_memory()
    return entry


def official_path_state_fusion(h, kernel_3, kernel_3_1, kernel_3_2, alpha, merged: bool) -> torch.Tensor:
    """The package's state fusion on the official path under test: the merged kernel (eval) or the branches (train)."""
    return state_fusion(h, kernel_3, kernel_3_1, kernel_3_2, alpha, path="merged" if merged else "branches")


def _fusion_step(fusion: Callable, h, params, dy, merged: bool, direction: str) -> Callable[[], List[torch.Tensor]]:
    """A call that runs ``fusion`` forward (returns [out]) or backward (returns the gradients of h and params)."""
    if direction == "forward":

        def forward():
            with torch.no_grad():
                return [fusion(h, *params, merged=merged)]

        return forward
    leaves = _leaves((h, *params))
    out = fusion(*leaves, merged=merged)
    return lambda: list(torch.autograd.grad(out, leaves, dy, retain_graph=True))


# --- models ------------------------------------------------------------------------------------------------------


def create_model(name: str, img_size: int) -> torch.nn.Module:
    # Swin's attention windows and relative-position tables depend on the input size; the other models do not.
    kwargs = {"img_size": img_size} if name.startswith("swin") and img_size != 224 else {}
    return timm.create_model(name, num_classes=NUM_CLASSES, **kwargs)


def _train_step(model, optimizer, images, labels, amp: Dict[str, object]) -> Callable[[], None]:
    def step():
        with torch.autocast(**amp):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _amp(device: torch.device) -> Dict[str, object]:
    return {"device_type": device.type, "dtype": torch.bfloat16}


def bench_models(run: Run):
    run.results["model_settings"] = {
        "batch_size": run.batch_size,
        "img_size": run.img_size,
        "amp_dtype": "bfloat16",
        "inference": "model.eval(), torch.inference_mode(), autocast bf16, forward only",
        "train": "model.train(), autocast bf16, cross-entropy, backward, AdamW step (lr 1e-4)",
        "warmup": run.model_warmup,
        "iters": run.model_iters,
        "peak_memory": "torch.cuda.max_memory_allocated in MiB (2**20 bytes), reset before each phase",
    }
    models = run.results.setdefault("models", {})
    for name in run.models:
        entry: Dict[str, object] = {}
        models[name] = entry
        if run.over_budget():
            entry.update(run.skipped())
            run.save()
            continue
        _bench_model(run, name, entry)
        run.free_memory()
        run.save()


def _bench_model(run: Run, name: str, entry: Dict[str, object]):
    device, batch = run.device, run.batch_size
    try:
        model = create_model(name, run.img_size).to(device)
    except Exception as error:
        entry["error"] = run.failed(f"model {name} (creation)", error)["error"]
        return
    entry["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    run.log(f"model {name}: {entry['params_m']:.1f} M parameters, batch {batch}, {run.img_size}x{run.img_size}")
    entry["peak_memory_mb"] = {"inference": None, "train": None}
    images = torch.randn(batch, 3, run.img_size, run.img_size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    amp = _amp(device)

    def infer():
        with torch.inference_mode(), torch.autocast(**amp):
            model(images)

    model.eval()
    _model_phase(run, name, entry, "inference", infer)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _model_phase(run, name, entry, "train", _train_step(model, optimizer, images, labels, amp))


def _model_phase(run: Run, name: str, entry: Dict[str, object], phase: str, step: Callable[[], None]):
    """Times ``step`` (one batch) into entry[f"{phase}_throughput_img_s"], with its peak memory on a GPU."""
    key = f"{phase}_throughput_img_s"
    entry[key] = None
    if run.over_budget():
        entry[f"{phase}_skipped"] = run.skipped()["skipped"]
        return
    if run.device.type == "cuda":
        run.free_memory()
        torch.cuda.reset_peak_memory_stats(run.device)
    try:
        timing = time_ms(step, run.model_warmup, run.model_iters, run.device)
        entry[key] = run.batch_size / (timing["ms"] * 1e-3)
        entry[f"{phase}_ms_per_batch"] = timing
        if run.device.type == "cuda":
            entry["peak_memory_mb"][phase] = torch.cuda.max_memory_allocated(run.device) / 2**20
        run.log(f"model {name:<32} {phase:<9} {entry[key]:9.1f} img/s  ({timing['ms']:.1f} ms per batch)")
    except Exception as error:
        entry[f"{phase}_error"] = run.failed(f"model {name} ({phase})", error)["error"]
    run.free_memory()


# --- profile -----------------------------------------------------------------------------------------------------


def top_profile_events(events: Iterable, device_type: DeviceType, top: int) -> Tuple[float, List[Dict[str, object]]]:
    """(total ms, the ``top`` names by total time) of the profiler events on ``device_type``.

    CUDA events are kernels, memcpys and memsets, timed on the GPU; CPU events are operators, by self time.
    User annotations (record_function ranges) are left out: they span kernels rather than being one.
    """
    totals: Dict[str, List[float]] = {}
    for event in events:
        if event.device_type != device_type or getattr(event, "is_user_annotation", False):
            continue
        us = event.self_cpu_time_total if device_type == DeviceType.CPU else event.time_range.elapsed_us()
        calls_and_us = totals.setdefault(event.name, [0, 0.0])
        calls_and_us[0] += 1
        calls_and_us[1] += us
    total_us = sum(us for _, us in totals.values())
    ranked = sorted(totals.items(), key=lambda item: item[1][1], reverse=True)[:top]
    rows = [
        {"name": name[:200], "calls": calls, "total_ms": us / 1e3, "percent": 100 * us / total_us if total_us else 0.0}
        for name, (calls, us) in ranked
    ]
    return total_us / 1e3, rows


def profile_train_step(run: Run):
    """Profiles one AMP training step of ``PROFILED_MODEL`` after warm-up steps, keeping the top kernels by time."""
    device = run.device
    entry = {"model": PROFILED_MODEL, "batch_size": run.batch_size, "img_size": run.img_size}
    run.results["profile_top_kernels"] = entry
    if run.over_budget():
        entry.update(run.skipped())
        return
    try:
        model = create_model(PROFILED_MODEL, run.img_size).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images = torch.randn(run.batch_size, 3, run.img_size, run.img_size, device=device)
        labels = torch.randint(0, NUM_CLASSES, (run.batch_size,), device=device)
        step = _train_step(model, optimizer, images, labels, _amp(device))
        for _ in range(max(1, min(run.model_warmup, 3))):
            step()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(device)
        with torch.profiler.profile(activities=activities) as profiler:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        device_type = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
        total_ms, rows = top_profile_events(profiler.events(), device_type, PROFILE_TOP)
        entry.update(
            timed_on="GPU (kernels, memcpy, memset)" if device.type == "cuda" else "CPU (operators, self time)",
            total_ms=total_ms,
            kernels=rows,
        )
        if not rows:
            entry["note"] = "the profiler recorded no events on the device (is CUPTI available?)"
        run.log(f"profile {PROFILED_MODEL}: {total_ms:.1f} ms in {len(rows)} top entries")
    except Exception as error:
        entry.update(run.failed(f"profile {PROFILED_MODEL}", error))
    run.free_memory()


# --- targets and the table ---------------------------------------------------------------------------------------


def target(description: str, measured: float | None, threshold: float, note: str = "", **details) -> Dict:
    """A target ``measured >= threshold``: pass and margin (measured - threshold) are null when not measured."""
    entry = {
        "description": description,
        "measured": measured,
        "threshold": threshold,
        "pass": None if measured is None else bool(measured >= threshold),
        "margin": None if measured is None else measured - threshold,
        **details,
    }
    if measured is None:
        entry["note"] = note or "not measured"
    return entry


def evaluate_targets(results: Dict[str, object]) -> Dict[str, Dict]:
    """The issue's targets, judged on the backend each op runs on in the model (``backends[op]["default"]``)."""
    targets = {}
    scan_backend = results.get("backends", {}).get("selective_scan", {}).get("default")
    for direction, threshold in (("forward", SCAN_FORWARD_MIN_FRACTION), ("backward", SCAN_BACKWARD_MIN_FRACTION)):
        section = results.get(f"scan_{direction}")
        if section is None:
            continue
        measured = section["backends"].get(scan_backend, {}).get("fraction_of_peak_bandwidth")
        note = "" if results.get("peak_bandwidth_bytes_per_s") else "the device's peak bandwidth is unknown"
        targets[f"scan_{direction}_fraction_of_peak_bandwidth"] = target(
            f"scan {direction} moves its bytes at >= {threshold:.0%} of peak DRAM bandwidth",
            measured,
            threshold,
            note,
            backend=scan_backend,
        )
    fusion_backend = results.get("backends", {}).get("dwconv2d", {}).get("default")
    for direction in ("forward", "backward"):
        section = results.get(f"fusion_{direction}")
        if section is None:
            continue
        for path in ("train", "eval"):
            measured = section[path]["backends"].get(fusion_backend, {}).get("speedup_vs_baseline")
            targets[f"fusion_{direction}_{path}_speedup"] = target(
                f"state fusion {direction} ({path} path) >= {FUSION_MIN_SPEEDUP:g}x faster than F.pad + F.conv2d",
                measured,
                FUSION_MIN_SPEEDUP,
                backend=fusion_backend,
            )
    models = results.get("models", {})
    for ours, swin in THROUGHPUT_PAIRS:
        if ours not in models or swin not in models:
            continue
        ours_img_s = models[ours].get("inference_throughput_img_s")
        swin_img_s = models[swin].get("inference_throughput_img_s")
        measured = ours_img_s / swin_img_s if ours_img_s and swin_img_s else None
        targets[f"inference_throughput_{ours}_vs_{swin}"] = target(
            f"{ours} inference throughput >= {swin}'s (ratio >= {THROUGHPUT_MIN_RATIO:g})",
            measured,
            THROUGHPUT_MIN_RATIO,
            ours_img_s=ours_img_s,
            swin_img_s=swin_img_s,
        )
    return targets


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def print_table(results: Dict[str, object]):
    print(f"\n{results['device']} | torch {results['torch']} | triton {results['triton']} | CUDA {results['cuda']}")
    backends = results["backends"]
    print("model backends: " + ", ".join(f"{op} -> {info['default']}" for op, info in backends.items()))
    peak = results["peak_bandwidth_bytes_per_s"]
    print(f"peak bandwidth: {_fmt(peak, '.0f', 1e-9)} GB/s ({results['peak_bandwidth_note']})")
    if "scan_forward" in results:
        shape = results["scan_forward"]["shape"]
        print(
            f"\nselective scan, batch {shape['batch']}, D {shape['channels']}, L {shape['length']}, "
            f"N {shape['d_state']}, bf16 inputs"
        )
        print(f"{'backend':<10} {'direction':<9} {'ms':>9} {'GB/s':>8} {'% peak':>7}  max rel diff vs reference")
        for direction in ("forward", "backward"):
            for name, entry in results[f"scan_{direction}"]["backends"].items():
                if "ms" not in entry:
                    print(f"{name:<10} {direction:<9} {_why_missing(entry)}")
                    continue
                fraction = _fmt(entry["fraction_of_peak_bandwidth"], ".1f", 100)
                diff = _fmt(entry["max_rel_diff_vs_reference"], ".2e")
                print(f"{name:<10} {direction:<9} {entry['ms']:9.3f} {entry['gb_per_s']:8.1f} {fraction:>7}  {diff}")
    if "fusion_forward" in results:
        shape = results["fusion_forward"]["shape"]
        print(
            f"\nstate fusion, batch {shape['batch']}, D {shape['channels']}, {shape['height']}x{shape['width']}, fp32"
        )
        print(f"{'path':<6} {'direction':<9} {'backend':<10} {'ms':>9} {'baseline':>9} {'speedup':>8}")
        for direction in ("forward", "backward"):
            for path in ("train", "eval"):
                section = results[f"fusion_{direction}"][path]
                baseline_ms = _fmt((section["baseline"] or {}).get("ms"), ".3f")
                for name, entry in section["backends"].items():
                    if "ms" not in entry:
                        print(f"{path:<6} {direction:<9} {name:<10} {_why_missing(entry)}")
                        continue
                    speedup = _fmt(entry["speedup_vs_baseline"], ".2f")
                    print(f"{path:<6} {direction:<9} {name:<10} {entry['ms']:9.3f} {baseline_ms:>9} {speedup:>7}x")
                for name, entry in section.get("fused", {}).items():
                    if "ms" in entry:
                        speedup = _fmt(entry["speedup_vs_baseline"], ".2f")
                        label = f"fused/{name}"
                        print(f"{path:<6} {direction:<9} {label:<10} {entry['ms']:9.3f} {baseline_ms:>9} {speedup:>7}x")
    if results.get("models"):
        settings = results["model_settings"]
        print(f"\nmodels, batch {settings['batch_size']}, {settings['img_size']}x{settings['img_size']}, AMP bf16")
        print(f"{'model':<32} {'infer img/s':>11} {'train img/s':>11} {'peak MiB infer':>14} {'peak MiB train':>14}")
        for name, entry in results["models"].items():
            memory = entry.get("peak_memory_mb") or {}
            print(
                f"{name:<32} {_fmt(entry.get('inference_throughput_img_s'), '.1f'):>11} "
                f"{_fmt(entry.get('train_throughput_img_s'), '.1f'):>11} "
                f"{_fmt(memory.get('inference'), '.0f'):>14} {_fmt(memory.get('train'), '.0f'):>14}"
                + ("" if not _model_problem(entry) else f"  {_model_problem(entry)}")
            )
    print("\ntargets")
    for name, entry in results["targets"].items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[entry["pass"]]
        print(
            f"{verdict:<5} {name:<70} measured {_fmt(entry['measured'], '.3f'):>8}  "
            f"threshold {entry['threshold']:g}  margin {_fmt(entry['margin'], '+.3f')}"
        )
    if results["errors"]:
        print("\nerrors")
        for error in results["errors"]:
            print(f"  {error['where']}: {error['error']}")


def _why_missing(entry: Dict[str, object]) -> str:
    return str(entry.get("reason") or entry.get("skipped") or entry.get("error"))


def _model_problem(entry: Dict[str, object]) -> str:
    keys = ("error", "skipped", "inference_error", "train_error", "inference_skipped", "train_skipped")
    return "; ".join(f"{key}: {entry[key]}" for key in keys if entry.get(key))


# --- command line ------------------------------------------------------------------------------------------------


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
    parser.add_argument("--only", type=_sections, default=SECTIONS, help="sections to run (default: all)")
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
    benches = {"scan": bench_scan, "fusion": bench_fusion, "models": bench_models}
    for section in run.sections:
        run.log(f"--- {section}")
        benches[section](run)
        run.free_memory()
        run.save()
    if args.profile:
        profile_train_step(run)
        run.save()
    print_table(run.results)
    print(f"\nwrote {run.path}", flush=True)
    return 1 if any(not error["out_of_memory"] for error in run.errors) else 0


if __name__ == "__main__":
    sys.exit(main())
