"""benchmarks/gpu.py (the package benchmarks/gpubench): its --smoke run on the CPU (the JSON report's schema and
arithmetic), its formulas, its timer and its checks.

The GPU figures themselves are not tested here (no timed tests): the smoke run exercises every code path at tiny
shapes, and these tests check that the report it writes is complete and self-consistent.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from benchmarks.gpubench import checks, cli, device, fusion, models, observation, profiling, scan, timing
from benchmarks.gpubench.report import Run
from benchmarks.gpubench.targets import THROUGHPUT_PAIRS, target
from spatial_mamba.ops import backend
from spatial_mamba.ops.state_fusion import fusion_taps

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.py"

REQUIRED_KEYS = {
    "device",
    "device_type",
    "torch",
    "triton",
    "cuda",
    "date",
    "peak_bandwidth_bytes_per_s",
    "peak_bandwidth_note",
    "settings",
    "backends",
    "scan_forward",
    "scan_backward",
    "fusion_forward",
    "fusion_backward",
    "observation_forward",
    "observation_backward",
    "model_settings",
    "models",
    "targets",
    "errors",
    "profile_top_kernels",
}
TARGET_KEYS = {"description", "measured", "threshold", "pass", "margin"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(report, out directory) of one `gpu.py --smoke --profile` run on the CPU."""
    out = tmp_path_factory.mktemp("gpu_smoke")
    env = {key: value for key, value in os.environ.items() if key not in ("SPATIAL_MAMBA_BACKEND", "TRITON_INTERPRET")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--profile", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"gpu.py --smoke failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return json.loads((out / "cpu-smoke.json").read_text()), out


def test_smoke_run_writes_one_report_named_after_the_device(smoke):
    report, out = smoke
    assert sorted(path.name for path in out.iterdir()) == ["cpu-smoke.json"]
    assert report["smoke"] is True and report["device_type"] == "cpu"
    assert report["errors"] == []


def test_smoke_report_has_every_required_key(smoke):
    report, _ = smoke
    assert REQUIRED_KEYS <= set(report)
    # CPU tensors: the scan runs on the compiled CPU kernels when they can be built, the convolution on the reference.
    cpu_kernels = backend.is_available("selective_scan", "cpu")[0]
    assert report["backends"]["selective_scan"]["default"] == ("cpu" if cpu_kernels else "reference")
    assert report["backends"]["dwconv2d"]["default"] == "reference"
    for op in ("selective_scan", "dwconv2d"):
        assert set(report["backends"][op]["status"]) == {"cuda", "triton", "reference"}


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_scan_section_counts_bytes_and_bandwidth_from_its_own_time(smoke, direction):
    report, _ = smoke
    section = report[f"scan_{direction}"]
    shape = section["shape"]
    assert (shape["batch"], shape["channels"], shape["length"], shape["d_state"]) == (2, 16, 32 * 32, 1)
    terms = scan.scan_bytes(2, 16, 1024, 1, 2, backward=direction == "backward")
    assert section["bytes_moved"] == {"total": sum(terms.values()), "terms": terms}
    assert set(section["backends"]) == {"cuda", "triton", "reference"}
    reference = section["backends"]["reference"]
    assert reference["available"] is True
    assert 0 < reference["ms_min"] <= reference["ms"]
    assert reference["gb_per_s"] == pytest.approx(section["bytes_moved"]["total"] / (reference["ms"] * 1e-3) / 1e9)
    assert reference["fraction_of_peak_bandwidth"] is None  # no peak bandwidth on a CPU
    # Checked against the reference run in float64: a float32 run differs, but by less than the threshold.
    assert 0.0 < reference["max_rel_diff_vs_reference"] <= reference["check_threshold"]
    assert (
        reference["check_threshold"] == checks.CHECK_MAX_REL_DIFF["float32" if direction == "forward" else "bfloat16"]
    )
    assert reference["check_pass"] is True
    for name in ("cuda", "triton"):
        assert section["backends"][name]["available"] is False
        assert section["backends"][name]["reason"]


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("path", ["train", "eval"])
def test_fusion_speedup_is_the_ratio_of_the_two_times(smoke, direction, path):
    report, _ = smoke
    section = report[f"fusion_{direction}"][path]
    baseline_ms = section["baseline"]["ms"]
    assert baseline_ms > 0
    ours = section["backends"]["reference"]
    assert ours["ms"] > 0
    assert ours["speedup_vs_baseline"] == pytest.approx(baseline_ms / ours["ms"], rel=1e-12)
    # float32: the two compute the same sums in a different order (our CPU backward uses forward convolutions)
    assert ours["max_rel_diff_vs_baseline"] <= 1e-5
    assert ours["check_pass"] is True
    # The one-pass op, timed once for both paths, against this path's baseline.
    fused = section["fused"]["reference"]
    assert fused["speedup_vs_baseline"] == pytest.approx(baseline_ms / fused["ms"], rel=1e-12)
    assert fused["ms"] == report[f"fusion_{direction}"]["train"]["fused"]["reference"]["ms"]
    # The one-pass op has no CPU backend without the Triton interpreter: its rows say why.
    for name in ("cuda", "triton"):
        assert section["fused"][name]["available"] is False and section["fused"][name]["reason"]


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_observation_section_times_both_ways_and_checks_the_fused_one(smoke, direction):
    report, _ = smoke
    section = report[f"observation_{direction}"]
    backward = direction == "backward"
    pixels = 32 * 32
    assert section["bytes_moved"] == {
        way: observation.observation_bytes(2, 16, pixels, way == "fused", backward) for way in ("unfused", "fused")
    }
    # fp32, per element of (B, D, H, W): 20 -> 12 bytes forward, 44 -> 20 backward.
    assert section["bytes_moved"]["fused"] == (20 if backward else 12) * 2 * 16 * pixels
    assert section["bytes_moved"]["unfused"] == (44 if backward else 20) * 2 * 16 * pixels
    entries = section["backends"]["reference"]
    assert entries["speedup_fused_vs_unfused"] == pytest.approx(entries["unfused"]["ms"] / entries["fused"]["ms"])
    assert entries["fused"]["max_rel_diff_vs_unfused"] <= 1e-5 and entries["fused"]["check_pass"] is True
    for name in ("cuda", "triton"):
        for way in ("unfused", "fused"):
            assert section["backends"][name][way]["available"] is False and section["backends"][name][way]["reason"]


def test_a_result_beyond_the_threshold_fails_the_check():
    threshold = checks.CHECK_MAX_REL_DIFF["float32"]
    assert checks.judge_difference(threshold / 2, "float32") == {"check_threshold": threshold, "check_pass": True}
    assert checks.judge_difference(threshold * 2, "float32")["check_pass"] is False
    # A fusion that zero-pads instead of replicating the border differs from the baseline far beyond it.
    h = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    params = [torch.randn(2, 1, 3, 3, dtype=torch.float64) for _ in range(3)] + [torch.rand(3, dtype=torch.float64)]
    replicate = fusion.native_state_fusion(h, *params, merged=False)
    zero = sum(
        torch.nn.functional.conv2d(h, params[3][i] * k, padding=d, dilation=d, groups=2)
        for i, (k, d) in enumerate(zip(params[:3], (1, 3, 5)))
    )
    assert checks.judge_difference(checks.relative_max_diff([zero], [replicate]), "float32")["check_pass"] is False


def test_fusion_taps_match_the_three_dilated_kernels():
    # The fused op's taps, applied by clamped gathers, equal the three-branch baseline.
    h = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    params = [torch.randn(3, 1, 3, 3, dtype=torch.float64) for _ in range(3)] + [torch.rand(3, dtype=torch.float64)]
    from tests.kernels.parity import gather_fusion

    fused = gather_fusion(h, fusion_taps(*params))
    torch.testing.assert_close(fused, fusion.native_state_fusion(h, *params, merged=False), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", models.SMOKE_MODELS)
def test_models_report_throughput_from_the_timed_batch(smoke, name):
    report, _ = smoke
    entry = report["models"][name]
    batch = report["model_settings"]["batch_size"]
    assert batch == 2 and report["model_settings"]["img_size"] == 32
    for phase in ("inference", "train"):
        timing = entry[f"{phase}_ms_per_batch"]
        assert 0 < timing["ms_min"] <= timing["ms"]
        assert entry[f"{phase}_throughput_img_s"] == pytest.approx(batch / (timing["ms"] * 1e-3))
        assert entry["peak_memory_mb"][phase] is None  # CUDA memory statistics only
    assert entry["params_m"] > 1


def test_targets_have_pass_fail_and_margin(smoke):
    report, _ = smoke
    targets = report["targets"]
    ours, swin = THROUGHPUT_PAIRS[0]
    expected = {
        "scan_forward_fraction_of_peak_bandwidth",
        "scan_backward_fraction_of_peak_bandwidth",
        *(f"fusion_{d}_{p}_speedup" for d in ("forward", "backward") for p in ("train", "eval")),
        f"inference_throughput_{ours}_vs_{swin}",
    }
    assert set(targets) == expected
    for name, entry in targets.items():
        assert TARGET_KEYS <= set(entry), name
        if entry["measured"] is None:
            assert entry["pass"] is None and entry["margin"] is None and entry["note"], name
        else:
            assert entry["pass"] is (entry["measured"] >= entry["threshold"]), name
            assert entry["margin"] == pytest.approx(entry["measured"] - entry["threshold"]), name
    # Bandwidth is unknown on a CPU; the other targets are measured on the backend the model uses.
    assert targets["scan_forward_fraction_of_peak_bandwidth"]["pass"] is None
    fusion = targets["fusion_forward_eval_speedup"]
    assert fusion["measured"] == report["fusion_forward"]["eval"]["backends"]["reference"]["speedup_vs_baseline"]
    throughput = targets[f"inference_throughput_{ours}_vs_{swin}"]
    models = report["models"]
    ratio = models[ours]["inference_throughput_img_s"] / models[swin]["inference_throughput_img_s"]
    assert throughput["measured"] == pytest.approx(ratio)


def test_profile_lists_the_top_entries_by_time(smoke):
    report, _ = smoke
    profile = report["profile_top_kernels"]
    assert profile["model"] == "spatial_mamba_tiny"
    rows = profile["kernels"]
    assert 0 < len(rows) <= profiling.PROFILE_TOP
    times = [row["total_ms"] for row in rows]
    assert times == sorted(times, reverse=True) and times[0] > 0
    assert sum(row["percent"] for row in rows) <= 100 + 1e-6


def test_scan_bytes_forward_by_hand():
    # batch 2, D 3, L 5, N 1, bf16: u, delta 2*3*5*2 = 60; B 2*1*5*2 = 20; A, delta_bias 3*4 = 12; hs 2*3*5*4 = 120.
    terms = scan.scan_bytes(2, 3, 5, 1, 2, backward=False)
    assert terms == {
        "read u": 60,
        "read delta": 60,
        "read B": 20,
        "read A": 12,
        "read delta_bias": 12,
        "write hs": 120,
    }
    assert sum(terms.values()) == 284


def test_scan_bytes_backward_by_hand():
    terms = scan.scan_bytes(2, 3, 5, 1, 2, backward=True)
    reads = {"read u": 60, "read delta": 60, "read B": 20, "read A": 12, "read delta_bias": 12}
    writes = {"write du": 60, "write ddelta": 60, "write dB": 20, "write dA": 12, "write ddelta_bias": 12}
    assert terms == {**reads, "read hs": 120, "read dhs": 120, **writes}
    assert sum(terms.values()) == 568


def test_scan_bytes_scale_with_state_size_and_dtype():
    # fp32, N 2: u, delta 2*3*5*4 = 120; B 2*2*5*4 = 80; A 3*2*4 = 24; delta_bias 12; hs 2*3*2*5*4 = 240.
    assert sum(scan.scan_bytes(2, 3, 5, 2, 4, backward=False).values()) == 596


def test_scan_bytes_at_the_benchmark_shape():
    # T stage 0: batch 128, D 128, L 3136, N 1, bf16 (the totals quoted in benchmarks/README.md).
    assert sum(scan.scan_bytes(128, 128, 3136, 1, 2, backward=False).values()) == 411_845_632
    assert sum(scan.scan_bytes(128, 128, 3136, 1, 2, backward=True).values()) == 823_691_264


@pytest.mark.parametrize(
    "name, bandwidth, stem",
    [
        ("NVIDIA H100 80GB HBM3", 3.35e12, "h100"),
        ("NVIDIA H100 PCIe", 2.0e12, "h100-pcie"),
        ("NVIDIA H200", 4.8e12, "h200"),
        ("NVIDIA A100-SXM4-80GB", 2.039e12, "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", 1.555e12, "a100-40gb"),
        ("NVIDIA GH200 480GB", None, "gh200-480gb"),
        ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", None, "h100-80gb-hbm3-mig-3g-40gb"),
        ("NVIDIA GeForce RTX 4090", None, "geforce-rtx-4090"),
    ],
)
def test_peak_bandwidth_by_device_name(name, bandwidth, stem):
    peak, note, file_stem = device.peak_bandwidth(name)
    assert peak == bandwidth
    assert file_stem == stem
    assert note


def _event(name, device_type, us, annotation=False):
    return SimpleNamespace(
        name=name,
        device_type=device_type,
        time_range=SimpleNamespace(elapsed_us=lambda: us),
        is_user_annotation=annotation,
    )


def test_top_profile_events_sums_gpu_kernels_by_name():
    events = [
        _event("scan_fwd", DeviceType.CUDA, 30.0),
        _event("gemm", DeviceType.CUDA, 50.0),
        _event("scan_fwd", DeviceType.CUDA, 30.0),
        _event("ProfilerStep#1", DeviceType.CUDA, 500.0, annotation=True),
        _event("aten::mm", DeviceType.CPU, 999.0),
        _event("copy", DeviceType.CUDA, 20.0),
    ]
    total_ms, rows = profiling.top_profile_events(events, DeviceType.CUDA, top=2)
    assert total_ms == pytest.approx(0.13)
    assert [(row["name"], row["calls"]) for row in rows] == [("scan_fwd", 2), ("gemm", 1)]
    assert rows[0]["total_ms"] == pytest.approx(0.06)
    assert rows[0]["percent"] == pytest.approx(100 * 60 / 130)


def test_target_pass_and_margin():
    met = target("x", 0.85, 0.8)
    assert met["pass"] is True and met["margin"] == pytest.approx(0.05)
    missed = target("x", 1.5, 2.0)
    assert missed["pass"] is False and missed["margin"] == pytest.approx(-0.5)
    unknown = target("x", None, 0.8, "peak unknown")
    assert unknown["pass"] is None and unknown["margin"] is None and unknown["note"] == "peak unknown"


@pytest.mark.parametrize("argv", [["--only", "scan,bogus"], ["--models", "not_a_timm_model"], ["--iters", "0"]])
def test_bad_options_are_rejected(argv, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_every_timing_in_the_report_comes_from_the_shared_timer(smoke):
    # One timer (timing.time_ms through Run.time) for every section: the same fields, the run's counts.
    report, _ = smoke
    settings = report["settings"]
    kernel = {"iters": settings["kernel_iters"], "warmup": settings["kernel_warmup"]}
    model = {"iters": settings["model_iters"], "warmup": settings["model_warmup"]}
    timings = [(entry, kernel) for d in ("forward", "backward") for entry in report[f"scan_{d}"]["backends"].values()]
    for d in ("forward", "backward"):
        for path in ("train", "eval"):
            section = report[f"fusion_{d}"][path]
            rows = [section["baseline"], *section["backends"].values(), *section["fused"].values()]
            timings += [(entry, kernel) for entry in rows]
    for entry in report["models"].values():
        timings += [(entry[f"{phase}_ms_per_batch"], model) for phase in ("inference", "train")]
    timed = [(entry, counts) for entry, counts in timings if "ms" in entry]
    assert len(timed) == 2 + 2 * 2 * 3 + 2 * 2  # scan and fusion on the reference backend, baselines, models
    for entry, counts in timed:
        assert {key: entry[key] for key in ("iters", "warmup")} == counts
        assert 0 < entry["ms_min"] <= entry["ms"]


def test_time_ms_takes_the_median_and_minimum_of_the_timed_calls(monkeypatch):
    # On the CPU each call is timed by the wall clock: durations 3, 1, 2, 10, 5 ms after two warm-up calls.
    ticks = iter([0.0, 0.003, 1.0, 1.001, 2.0, 2.002, 3.0, 3.010, 4.0, 4.005])
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    calls = []
    result = timing.time_ms(lambda: calls.append(1), warmup=2, iters=5, device=torch.device("cpu"))
    assert len(calls) == 7
    assert result["ms"] == pytest.approx(3.0) and result["ms_min"] == pytest.approx(1.0)
    assert (result["iters"], result["warmup"]) == (5, 2)


def test_pass_step_times_the_forward_without_autograd_and_the_backward_of_one_retained_forward():
    x, w, grad = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), torch.randn(4).double()
    calls = []

    def product(x, w):
        calls.append(torch.is_grad_enabled())
        return x * w

    (out,) = timing.pass_step("forward", product, (x, w), grad)()
    assert calls == [False] and not out.requires_grad
    torch.testing.assert_close(out, x * w)
    backward = timing.pass_step("backward", product, (x, w), grad)
    assert calls == [False, True]  # the forward runs once, when the step is built
    for _ in range(2):  # the retained graph serves every timed call
        dx, dw = backward()
        torch.testing.assert_close(dx, grad * w)
        torch.testing.assert_close(dw, grad * x)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="sideways"):
        timing.pass_step("sideways", product, (x, w), grad)


def _zero_padded_fusion(h, kernel_3, kernel_3_1, kernel_3_2, alpha):
    branches = zip((kernel_3, kernel_3_1, kernel_3_2), (1, 3, 5))
    return sum(
        torch.nn.functional.conv2d(h, alpha[i] * k, padding=d, dilation=d, groups=h.shape[1])
        for i, (k, d) in enumerate(branches)
    )


def test_a_fusion_row_beyond_the_threshold_is_recorded_as_an_error(tmp_path):
    run = Run(cli.parse_args(["--smoke", "--out", str(tmp_path)]))
    h = torch.randn(1, 2, 8, 8)
    params = [torch.randn(2, 1, 3, 3) for _ in range(3)] + [torch.rand(3) + 0.5]
    inputs, dy = (h, *params), torch.randn_like(h)
    baseline = functools.partial(fusion.native_state_fusion, merged=False)
    expected = timing.pass_step("forward", baseline, inputs, dy)()
    section = {"baseline": {"ms": 1.0}}
    row = fusion.FusionRow("forward train (zero padding)", _zero_padded_fusion, "")
    entry = row.measure(run, "forward", inputs, dy, expected, section)
    assert entry["check_pass"] is False and entry["max_rel_diff_vs_baseline"] > entry["check_threshold"]
    assert entry["speedup_vs_baseline"] == pytest.approx(1.0 / entry["ms"])
    assert [(e["where"], e["out_of_memory"]) for e in run.errors] == [("fusion forward train (zero padding)", False)]
    # The same row with the right function passes and records nothing.
    run.errors.clear()
    right = fusion.FusionRow("forward train (replicate)", baseline, "").measure(
        run, "forward", inputs, dy, expected, section
    )
    assert right["check_pass"] is True and run.errors == []


def test_a_violated_check_threshold_makes_the_run_exit_with_status_1(tmp_path, monkeypatch, capsys):
    # Thresholds of zero: the float32 reference scan differs from its float64 run, so every check fails.
    monkeypatch.setattr(checks, "CHECK_MAX_REL_DIFF", {"float32": 0.0, "bfloat16": 0.0})
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    status = cli.main(["--smoke", "--only", "scan", "--batch-size", "1", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("*-smoke.json")
    report = json.loads(path.read_text())
    assert status == 1
    assert {"scan forward (reference)", "scan backward (reference)"} <= {e["where"] for e in report["errors"]}
    assert report["scan_forward"]["backends"]["reference"]["check_pass"] is False
    assert "errors" in capsys.readouterr().out
