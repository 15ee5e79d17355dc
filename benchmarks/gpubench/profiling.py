"""``--profile``: the kernels (or, on a CPU, the operators) that take the most time in one training step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Iterable, List, Tuple

import torch
from torch.autograd import DeviceType

from .models import NUM_CLASSES, amp, create_model, train_step

if TYPE_CHECKING:
    from .report import Run

PROFILED_MODEL = "spatial_mamba_tiny"
PROFILE_TOP = 25


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
        step = train_step(model, optimizer, images, labels, amp(device))
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
