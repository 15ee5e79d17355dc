"""The performance targets: each a measured figure, its threshold, pass/fail and the margin."""

from __future__ import annotations

from typing import Dict

SCAN_FORWARD_MIN_FRACTION = 0.80
SCAN_BACKWARD_MIN_FRACTION = 0.60
FUSION_MIN_SPEEDUP = 2.0
THROUGHPUT_MIN_RATIO = 1.0
# Each Spatial-Mamba variant against the Swin of its size (the paper's comparison).
THROUGHPUT_PAIRS = (
    ("spatial_mamba_tiny", "swin_tiny_patch4_window7_224"),
    ("spatial_mamba_small", "swin_small_patch4_window7_224"),
    ("spatial_mamba_base", "swin_base_patch4_window7_224"),
)


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
    """The targets, judged on the backend each op runs on in the model (``backends[op]["default"]``)."""
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
