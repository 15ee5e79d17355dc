"""The table printed at the end of a run, from the report alone."""

from __future__ import annotations

from typing import Dict

from .observation import observation_rows


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
                # The one-pass op's rows are listed only when it ran.
                rows = list(section["backends"].items())
                rows += [(f"fused/{name}", entry) for name, entry in section.get("fused", {}).items() if "ms" in entry]
                for label, entry in rows:
                    if "ms" not in entry:
                        print(f"{path:<6} {direction:<9} {label:<10} {_why_missing(entry)}")
                        continue
                    speedup = _fmt(entry["speedup_vs_baseline"], ".2f")
                    print(f"{path:<6} {direction:<9} {label:<10} {entry['ms']:9.3f} {baseline_ms:>9} {speedup:>7}x")
    if "observation_forward" in results:
        shape = results["observation_forward"]["shape"]
        print(
            f"\nfused observation, batch {shape['batch']}, D {shape['channels']}, {shape['height']}x{shape['width']}, "
            "fp32"
        )
        print(f"{'backend':<10} {'direction':<9} {'unfused ms':>10} {'fused ms':>9} {'speedup':>8}")
        for direction, name, unfused, fused, speedup in observation_rows(results):
            print(
                f"{name:<10} {direction:<9} {_fmt(unfused, '.3f'):>10} {_fmt(fused, '.3f'):>9} "
                f"{_fmt(speedup, '.2f'):>7}x"
            )
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
