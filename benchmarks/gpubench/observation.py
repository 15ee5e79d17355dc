"""The fused observation section: ``observation_forward`` and ``observation_backward``.

For each backend, y = fusion(h)·C + D·u (the mixer's fusion and observation step, d_state 1) two ways: ``unfused``,
the backend's ``state_fusion`` op followed by the observation in PyTorch (the fused states are written and read
back), and ``fused``, the backend's ``fused_observation`` op. The speed-up is unfused ms / fused ms; the fused result
is checked against the unfused one.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Dict

import torch

from spatial_mamba.ops import backend
from spatial_mamba.ops.state_fusion import fusion_taps

from .backends import backend_impl
from .checks import difference_error, judge_difference, relative_max_diff
from .timing import pass_step

if TYPE_CHECKING:
    from .report import Run

DIRECTIONS = ("forward", "backward")
DEFINITION = (
    "y = fusion(h)*C + D*u with float32 h, u, C. 'unfused': the backend's state_fusion op, then y in PyTorch; "
    "'fused': the backend's fused_observation op. Taps are built from the kernels and alpha inside the step. "
    "speedup_fused_vs_unfused = unfused ms / fused ms."
)


def observation_bytes(batch: int, channels: int, pixels: int, fused: bool, backward: bool) -> int:
    """The bytes a float32 pass must move, counting every full (B, D, H, W) tensor read or written once (C, taps and
    D are negligible). Forward: unfused reads h, writes the fused states F, reads them and u, writes y (5 tensors);
    fused reads h and u and writes y (3). Backward, unfused: dF = dy·C (read dy, write dF), du = dy·D (read dy, write
    du), dC = Σ_c dy·F (read dy and the saved F), dD = Σ dy·u (read dy and u), then the fusion's backward (read h and
    dF, write dh): 11, counting the two reductions without temporaries (eager PyTorch also writes and reads their
    products: about 15, kernels/README.md). Fused: read h, u and dy, write dh and du (5)."""
    tensors = (5 if backward else 3) if fused else (11 if backward else 5)
    return tensors * 4 * batch * channels * pixels


def unfused_observation(fusion: Callable, h, C, u, D, *params) -> torch.Tensor:
    return torch.addcmul(u * D[:, None, None], fusion(h, fusion_taps(*params)), C[:, None])


def fused_observation_step(fused: Callable, h, C, u, D, *params) -> torch.Tensor:
    return fused(h, fusion_taps(*params), C, u, D)


def bench_observation(run: Run):
    batch, channels, side = run.batch_size, run.channels, run.side
    h = torch.randn(batch, channels, side, side, device=run.device)
    C = torch.randn(batch, side, side, device=run.device)
    u = torch.randn(batch, channels, side, side, device=run.device)
    D = torch.rand(channels, device=run.device) + 0.5
    params = [0.1 * torch.randn(channels, 1, 3, 3, device=run.device) for _ in range(3)]
    params.append(torch.rand(3, device=run.device) + 0.5)
    inputs = (h, C, u, D, *params)
    dy = torch.randn_like(h)
    taps = fusion_taps(*params)
    for direction in DIRECTIONS:
        backward = direction == "backward"
        run.results[f"observation_{direction}"] = {
            "shape": {"batch": batch, "channels": channels, "height": side, "width": side},
            "dtype": "float32",
            "definition": DEFINITION,
            "bytes_moved": {
                way: observation_bytes(batch, channels, side * side, way == "fused", backward)
                for way in ("unfused", "fused")
            },
            "backends": {},
        }
    for name in backend.CUDA_ORDER:
        fusion, why_fusion = backend_impl("state_fusion", name, h, taps)
        fused, why_fused = backend_impl("fused_observation", name, h, taps, C, u, D)
        ways = {
            "unfused": (None if fusion is None else functools.partial(unfused_observation, fusion), why_fusion),
            "fused": (None if fused is None else functools.partial(fused_observation_step, fused), why_fused),
        }
        for direction in DIRECTIONS:
            section = run.results[f"observation_{direction}"]
            entries = section["backends"][name] = {}
            results = {}
            for way, (call, why) in ways.items():
                entry = entries[way] = {"available": call is not None}
                if call is None:
                    entry["reason"] = why
                    continue
                if run.over_budget():
                    entry.update(run.skipped())
                    continue
                try:
                    with backend.force(name):
                        step = pass_step(direction, call, inputs, dy)
                        results[way] = step()
                        entry.update(run.time(step, "kernel"))
                    entry["gb_per_s"] = section["bytes_moved"][way] / (entry["ms"] * 1e-3) / 1e9
                    run.log(f"observation {direction:<8} {way:<7} ({name}) {entry['ms']:9.3f} ms")
                except Exception as error:
                    entry.update(run.failed(f"observation {direction} {way} ({name})", error))
                run.free_memory()
            if "ms" in entries["unfused"] and "ms" in entries["fused"]:
                entries["speedup_fused_vs_unfused"] = entries["unfused"]["ms"] / entries["fused"]["ms"]
                check = entries["fused"]
                check["max_rel_diff_vs_unfused"] = relative_max_diff(results["fused"], results["unfused"])
                check.update(judge_difference(check["max_rel_diff_vs_unfused"], "float32"))
                if check["check_pass"] is False:
                    run.failed(f"observation {direction} fused ({name})", difference_error(check))
        run.save()


def observation_rows(results: Dict[str, object]):
    """(direction, backend, unfused ms, fused ms, speed-up) for the table; None where a way did not run."""
    for direction in DIRECTIONS:
        for name, entries in results[f"observation_{direction}"]["backends"].items():
            unfused, fused = entries["unfused"].get("ms"), entries["fused"].get("ms")
            yield direction, name, unfused, fused, entries.get("speedup_fused_vs_unfused")
