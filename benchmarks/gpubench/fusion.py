"""The state fusion section: ``fusion_forward`` and ``fusion_backward``, each backend and the one-pass op against
the same fusion written with PyTorch."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import TYPE_CHECKING, Callable, Dict, List

import torch
import torch.nn.functional as F

from spatial_mamba.ops import backend
from spatial_mamba.ops.state_fusion import DILATIONS, fusion_taps, merge_state_fusion_kernels, state_fusion

from .backends import backend_impl
from .checks import difference_error, judge_difference, relative_max_diff
from .timing import pass_step

if TYPE_CHECKING:
    from .report import Run

DIRECTIONS = ("forward", "backward")
PATHS = {
    "train": "three replicate-padded depthwise 3x3 convolutions at dilations 1, 3, 5 (model.train())",
    "eval": "one replicate-padded depthwise 11x11 convolution with the merged kernel (model.eval())",
}
FUSION_BASELINE_DEFINITION = (
    "The same state fusion written with PyTorch: for each branch F.pad(h, mode='replicate') then a depthwise "
    "F.conv2d, alpha folded into the kernels, branches summed; the eval path's merged 11x11 kernel from "
    "merge_state_fusion_kernels. On CUDA, F.conv2d runs PyTorch's native depthwise kernels here, not cuDNN: PyTorch "
    "sends fp32 NCHW and every dilated depthwise convolution to them. speedup_vs_baseline = baseline ms / backend "
    "ms. 'fused' rows time the one-pass 25-tap state_fusion op (taps built from the kernels and alpha in the step)."
)


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


def official_path_state_fusion(h, kernel_3, kernel_3_1, kernel_3_2, alpha, merged: bool) -> torch.Tensor:
    """The package's state fusion on the official path under test: the merged kernel (eval) or the branches (train)."""
    return state_fusion(h, kernel_3, kernel_3_1, kernel_3_2, alpha, path="merged" if merged else "branches")


def bench_fusion(run: Run):
    shape = {"batch": run.batch_size, "channels": run.channels, "height": run.side, "width": run.side}
    # float32 states, as the scan returns them and the model fuses them (paper Eq. 4), without autocast.
    h = torch.randn(run.batch_size, run.channels, run.side, run.side, device=run.device)
    params = [0.1 * torch.randn(run.channels, 1, 3, 3, device=run.device) for _ in range(3)]
    params.append(torch.rand(3, device=run.device) + 0.5)
    inputs = (h, *params)
    dy = torch.randn_like(h)
    for direction in DIRECTIONS:
        run.results[f"fusion_{direction}"] = {
            "shape": shape,
            "dtype": "float32",
            "baseline_definition": FUSION_BASELINE_DEFINITION,
            **{path: {"description": text, "baseline": None, "backends": {}} for path, text in PATHS.items()},
        }

    fused: Dict[str, Dict[str, object]] = {}
    for path in PATHS:
        merged = path == "eval"
        expected: Dict[str, List[torch.Tensor]] = {}
        for direction in DIRECTIONS:
            section = run.results[f"fusion_{direction}"][path]
            try:
                step = pass_step(direction, functools.partial(native_state_fusion, merged=merged), inputs, dy)
                expected[direction] = step()
                section["baseline"] = run.time(step, "kernel")
                run.log(f"fusion {direction:<8} {path:<5} baseline  {section['baseline']['ms']:9.3f} ms")
            except Exception as error:
                section["baseline"] = run.failed(f"fusion {direction} {path} (baseline)", error)
            run.free_memory()

        official = functools.partial(official_path_state_fusion, merged=merged)
        for name in backend.CUDA_ORDER:
            impl, why = backend_impl("dwconv2d", name, h, params[0])
            for direction in DIRECTIONS:
                section = run.results[f"fusion_{direction}"][path]
                row = FusionRow(f"{direction} {path} ({name})", None if impl is None else official, why, force=name)
                section["backends"][name] = row.measure(run, direction, inputs, dy, expected.get(direction), section)
            run.save()

        for direction in DIRECTIONS:
            section = run.results[f"fusion_{direction}"][path]
            if direction in fused:
                # The one op serves both paths: timed and checked once, its speed-up over each path's baseline.
                section["fused"] = {name: _rebased(entry, section) for name, entry in fused[direction].items()}
                continue
            section["fused"] = fused[direction] = {}
            for name in backend.CUDA_ORDER:
                impl, why = backend_impl("state_fusion", name, h, fusion_taps(*params))
                fusion = None if impl is None else functools.partial(_fused_state_fusion, impl)
                row = FusionRow(f"{direction} fused ({name})", fusion, why)
                section["fused"][name] = row.measure(run, direction, inputs, dy, expected.get(direction), section)
            run.save()


def _speedup(section: Dict[str, object], ms: float) -> float | None:
    """The baseline's time in ``section`` over ``ms``, or None without a baseline time."""
    baseline_ms = (section["baseline"] or {}).get("ms")
    return None if baseline_ms is None else baseline_ms / ms


def _rebased(entry: Dict[str, object], section: Dict[str, object]) -> Dict[str, object]:
    """A copy of a timed row ``entry`` with its speed-up over the baseline of ``section``."""
    return {**entry, "speedup_vs_baseline": _speedup(section, entry["ms"])} if "ms" in entry else dict(entry)


def _fused_state_fusion(impl: Callable, h: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    # The taps are built inside the timed step, so that the backward reaches the kernels and alpha.
    return impl(h, fusion_taps(*params))


@dataclasses.dataclass
class FusionRow:
    """One row of the fusion table: ``fusion(h, *params)`` (None when the backend cannot run, ``why`` saying why),
    run with backend ``force`` forced, or as chosen when None."""

    label: str
    fusion: Callable[..., torch.Tensor] | None
    why: str
    force: str | None = None

    def measure(self, run: Run, direction, inputs, dy, expected, section) -> Dict[str, object]:
        """The row's entry: its time, its check against the baseline's ``expected`` output or gradients, and its
        speed-up over the baseline's time in ``section``."""
        entry: Dict[str, object] = {"available": self.fusion is not None}
        if self.fusion is None:
            entry["reason"] = self.why
            return entry
        if run.over_budget():
            entry.update(run.skipped())
            return entry
        try:
            with backend.force(self.force) if self.force else contextlib.nullcontext():
                step = pass_step(direction, self.fusion, inputs, dy)
                check = step()
                timing = run.time(step, "kernel")
            entry.update(timing)
            if expected is not None:
                entry["max_rel_diff_vs_baseline"] = relative_max_diff(check, expected)
                entry.update(judge_difference(entry["max_rel_diff_vs_baseline"], "float32"))
                if entry["check_pass"] is False:
                    run.failed(f"fusion {self.label}", difference_error(entry))
            speedup = entry["speedup_vs_baseline"] = _speedup(section, timing["ms"])
            run.log(
                f"fusion {self.label:<24} {timing['ms']:9.3f} ms"
                + ("" if speedup is None else f"  {speedup:5.2f}x baseline")
            )
        except Exception as error:
            entry.update(run.failed(f"fusion {self.label}", error))
        run.free_memory()
        return entry
