"""The device: its name, the file name of its report, its peak DRAM bandwidth and the bandwidth figures."""

from __future__ import annotations

import platform
import re
from typing import Dict, Tuple

import torch

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


def peak_bandwidth(device_name: str) -> Tuple[float | None, str, str]:
    """(peak DRAM bandwidth in bytes/s or None, how it was found, file name stem) for a CUDA device name."""
    upper = device_name.upper()
    stem = re.sub(r"[^a-z0-9]+", "-", device_name.lower().replace("nvidia", "")).strip("-") or "gpu"
    if "MIG" in upper:
        return None, f"{device_name!r} is a MIG slice: its share of the GPU's bandwidth is unknown", stem
    for label, words, bandwidth, name in PEAK_BANDWIDTH:
        if all(re.search(rf"(?<![A-Z0-9]){word}", upper) for word in words):
            return bandwidth, f"datasheet figure for the {label}", name
    return None, f"{device_name!r} is not in the peak bandwidth table of benchmarks/gpubench/device.py", stem


def describe(device: torch.device) -> Tuple[str, float | None, str, str]:
    """(name, peak DRAM bandwidth in bytes/s or None, how it was found, file name stem) of ``device``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return (name, *peak_bandwidth(name))
    name = platform.processor() or platform.machine() or "cpu"
    return name, None, "no peak bandwidth figure for a CPU", "cpu"


def bandwidth_from_properties(device: torch.device) -> float | None:
    """2 x memory clock x bus width, when torch reports them: a cross-check of the datasheet table."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8


def bandwidth_figures(total_bytes: int, ms: float, peak: float | None) -> Dict[str, float | None]:
    """GB/s and the fraction of ``peak`` (None when unknown) of ``total_bytes`` moved in ``ms``."""
    bytes_per_s = total_bytes / (ms * 1e-3)
    return {"gb_per_s": bytes_per_s / 1e9, "fraction_of_peak_bandwidth": None if peak is None else bytes_per_s / peak}
