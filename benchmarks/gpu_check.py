"""The Python steps of ``benchmarks/gpu_check.sh`` (the first run of the kernels on a GPU machine), one per command:

    python benchmarks/gpu_check.py env                 # torch, CUDA, Triton, the GPU and its SM count
    python benchmarks/gpu_check.py dispatch            # fails unless every op picks the cuda backend on this GPU
    python benchmarks/gpu_check.py drift OUT.json      # the long-memory scan against float64, every backend here
    python benchmarks/gpu_check.py sanitize            # every op forward and backward at tiny shapes (for
                                                       #   compute-sanitizer)
    python benchmarks/gpu_check.py stages OUT.json     # Spatial-Mamba-T's four stages at batch 128: time and GB/s
                                                       #   of every kernel against a measured device copy

``drift`` and ``env`` also run on the CPU (``gpu_check.sh --dry-run``): there ``drift`` covers the reference and
``cpu`` backends at a shorter row. Each command prints its figures and exits non-zero when its check fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spatial_mamba.ops import backend, fused_observation, selective_scan_fn, state_fusion  # noqa: E402
from tests.kernels import parity  # noqa: E402

OPS = ("selective_scan", "dwconv2d", "state_fusion", "fused_observation")
# Spatial-Mamba-T at 224x224: d_inner and the side of the token map of each stage.
STAGES = [(128, 56), (256, 28), (512, 14), (1024, 7)]
# The long-memory case: no state resets, the model's slowest initial decays (tests/kernels/parity.py).
DRIFT_TOLERANCE = 2e-5  # max |error| / max |value|, the parity tests' atol


def env(_args) -> int:
    print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        print(
            f"cuda:{index} {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB"
        )
    print(backend.describe())
    return 0


def _probes() -> Dict[str, tuple]:
    """Model-like float32 inputs of every op on the GPU, as the public functions hand them to the dispatcher."""
    scan_inputs, _ = parity.scan_inputs(2, 16, 196, torch.float32, device="cuda")
    h, taps, _ = parity.fusion_inputs(2, 16, 14, 14, torch.float32, device="cuda")
    obs = parity.observation_inputs(2, 16, 14, 14, torch.float32, device="cuda")[:5]
    x, weight, _ = parity.conv_inputs(2, 16, 14, 14, 3, torch.float32, device="cuda")
    return {
        "selective_scan": tuple(scan_inputs.values()),
        "dwconv2d": (x, weight),
        "state_fusion": (h, taps),
        "fused_observation": obs,
    }


def dispatch(_args) -> int:
    if not torch.cuda.is_available():
        print("dispatch: no CUDA device")
        return 1
    failed = 0
    for op, tensors in _probes().items():
        choice = backend.explain(op, *tensors)
        print(f"{op}: {choice.summary()}")
        failed += choice.backend != "cuda"
    print("dispatch: every op runs on cuda" if not failed else f"dispatch: {failed} op(s) do not run on cuda")
    return 1 if failed else 0


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected).abs().max() / expected.abs().max()).item()


def drift(args) -> int:
    on_gpu = torch.cuda.is_available()
    shape = (2, 16, 66_600) if on_gpu else (1, 4, 66_600)
    names = ["cuda", "triton", "reference"] if on_gpu else ["cpu", "reference"]
    results: Dict[str, Dict[str, float]] = {}
    failed = False
    for dtype in (torch.float32, torch.bfloat16):
        inputs, dhs = parity.scan_inputs(*shape, dtype, device="cuda" if on_gpu else "cpu", memory="long")
        exact = {k: None if v is None else v.double().cpu() for k, v in inputs.items()}
        hs_ref, grads_ref = parity.run_scan(parity.sequential_scan, exact, True, dhs.double().cpu())
        for name in names:
            ok, why = backend.is_available("selective_scan", name)
            if not ok or (name == "cpu" and dtype != torch.float32):
                print(f"drift {name} {dtype}: skipped ({why if not ok else 'float32 only'})")
                continue
            with backend.force(name, "selective_scan"):
                hs, grads = parity.run_scan(
                    lambda u, d, A, B, b, s: selective_scan_fn(u, d, A, B, delta_bias=b, delta_softplus=s),
                    inputs,
                    True,
                    dhs,
                )
            errors = {"hs": _relative_error(hs, hs_ref)}
            errors.update({f"d{key}": _relative_error(grads[key], grads_ref[key]) for key in ("A", "delta_bias")})
            results[f"{name}/{str(dtype).replace('torch.', '')}"] = errors
            worst = max(errors.values())
            failed |= worst > DRIFT_TOLERANCE
            print(f"drift {name} {dtype} {shape}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    Path(args.out).write_text(json.dumps({"shape": shape, "tolerance": DRIFT_TOLERANCE, "errors": results}, indent=1))
    print(f"drift: {'FAIL' if failed else 'ok'} (max |error| / max |value| <= {DRIFT_TOLERANCE})")
    return 1 if failed else 0


def sanitize(_args) -> int:
    """Every op forward and backward at tiny shapes on its cuda backend (and Triton), for compute-sanitizer."""
    for name in ("cuda", "triton"):
        with backend.force(name):
            inputs, dhs = parity.scan_inputs(2, 3, 257, torch.bfloat16, device="cuda")
            scan = lambda *a: selective_scan_fn(*a[:4], delta_bias=a[4], delta_softplus=a[5])  # noqa: E731
            parity.run_scan(scan, inputs, True, dhs)
            h, taps, dy = parity.fusion_inputs(1, 4, 12, 37, torch.float32, device="cuda")
            parity.run_fusion(backend.implementation("state_fusion", name), h, taps, dy)
            obs = parity.observation_inputs(1, 4, 12, 37, torch.float32, torch.bfloat16, device="cuda")
            parity.run_observation(backend.implementation("fused_observation", name), *obs)
            x, weight, dy = parity.conv_inputs(1, 4, 12, 37, 3, torch.float32, device="cuda")
            parity.run_conv(backend.implementation("dwconv2d", name), x, weight, 3, dy)
        torch.cuda.synchronize()
        print(f"sanitize: {name} ran every op forward and backward")
    return 0


def _time_ms(step: Callable[[], object], iters: int = 20) -> float:
    for _ in range(3):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _copy_bandwidth() -> float:
    """Bytes/s of a 4 GiB device-to-device copy (read + write): the reachable ceiling."""
    src = torch.empty(2**29, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), iters=10)
    return 2 * src.numel() * 4 / (ms / 1e3)


def _stage_cases(batch: int, channels: int, side: int) -> Dict[str, tuple]:
    """case -> (forward step, bytes it must move at least) at one stage: float32 states h and fused output,
    bfloat16 u, C and scan inputs (what the model hands the kernels under bfloat16 autocast)."""
    h = torch.randn(batch, channels, side, side, device="cuda")
    kernels = [torch.randn(channels, 1, 3, 3, device="cuda") / 3 for _ in range(3)]
    alpha = torch.rand(3, device="cuda") + 0.5
    C = torch.randn(batch, side, side, device="cuda", dtype=torch.bfloat16)
    u = torch.randn(batch, channels, side, side, device="cuda", dtype=torch.bfloat16)
    D = torch.randn(channels, device="cuda")
    scan, _ = parity.scan_inputs(batch, channels, side * side, torch.bfloat16, device="cuda")
    elements = h.numel()
    return {
        "fusion_fwd": (lambda: state_fusion(h, *kernels, alpha), 8 * elements),
        "observation_fwd": (lambda: fused_observation(h, *kernels, alpha, C, u, D), 10 * elements),
        "scan_fwd": (
            lambda: selective_scan_fn(scan["u"], scan["delta"], scan["A"], scan["B"], delta_bias=scan["delta_bias"]),
            8 * elements,
        ),
    }


def stages(args) -> int:
    if not torch.cuda.is_available():
        print("stages: no CUDA device")
        return 1
    copy = _copy_bandwidth()
    print(f"device copy: {copy / 1e9:.0f} GB/s")
    rows: List[Dict[str, object]] = []
    batch = 128
    for channels, side in STAGES:
        cases = _stage_cases(batch, channels, side)
        for name in ("cuda", "triton"):
            for case, (step, nbytes) in cases.items():
                row = {"stage": f"{side}x{side}", "channels": channels, "backend": name, "case": case}
                try:
                    with backend.force(name), torch.no_grad():
                        ms = _time_ms(step)
                except Exception as error:  # a failure is a figure of its own in the report
                    rows.append({**row, "error": str(error)})
                    print(f"{side}x{side} {name} {case}: error {error}")
                    continue
                rate = nbytes / (ms / 1e3)
                rows.append({**row, "ms": ms, "gb_per_s": rate / 1e9, "fraction_of_copy": rate / copy})
                figures = f"{ms:.3f} ms, {rate / 1e9:.0f} GB/s, {rate / copy:.2f} of the copy"
                print(f"{side}x{side} C={channels} {name} {case}: {figures}")
        del cases
        torch.cuda.empty_cache()
    report = {"device": torch.cuda.get_device_name(), "batch": batch, "copy_bytes_per_s": copy, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 1 if any("error" in row for row in rows) else 0


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env").set_defaults(run=env)
    commands.add_parser("dispatch").set_defaults(run=dispatch)
    commands.add_parser("sanitize").set_defaults(run=sanitize)
    for name, run in (("drift", drift), ("stages", stages)):
        command = commands.add_parser(name)
        command.add_argument("out", help="JSON file to write")
        command.set_defaults(run=run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
