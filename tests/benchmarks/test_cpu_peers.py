"""benchmarks/cpu_peers.py: one smoke run of an inference case through all three paths, Spatial-Mamba-T and Swin-T.
No speed is asserted (no timed tests): the report must hold every path, ratios that are the medians' ratios or an
explicit "n/a" with its reason, and the compile and export times."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "cpu_peers.py"
MODELS = ("Spatial-Mamba-T", "Swin-T")


@pytest.mark.slow
def test_smoke_report_holds_every_path_with_ratios_to_swin_t_and_setup_times(tmp_path):
    out = tmp_path / "peers.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--cases", "infer_b8_224", "--models", *MODELS, "--out", out]
    result = subprocess.run(list(map(str, command)), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())

    assert report["smoke"] and report["cases"] == {"infer_b8_224": {"train": False, "batch": 1, "img_size": 64}}
    assert report["threads"] >= 1 and report["cpu"] and report["torch"] and report["onnxruntime"]
    assert "--smoke" in report["command"]
    by_path = report["results"]["infer_b8_224"]
    assert set(by_path) == {"eager", "compiled", "onnx"}
    for path, models in by_path.items():
        assert set(models) == set(MODELS)
        assert models["Swin-T"]["ratio_to_swin_t"] == 1.0
        for label, entry in models.items():
            if entry["ratio_to_swin_t"] == "n/a":
                assert entry["error"], (path, label)
                continue
            assert math.isfinite(entry["ratio_to_swin_t"]) and entry["ratio_to_swin_t"] > 0, (path, label)
            assert entry["ratio_to_swin_t"] == pytest.approx(entry["median_s"] / models["Swin-T"]["median_s"])
            assert len(entry["runs_s"]) == report["rounds"] == 1
            if path == "compiled":
                assert entry["compile_s"] >= 0 and entry["first_call_s"] >= entry["compile_s"]
            if path == "onnx":
                assert entry["export_s"] > 0 and entry["exporter"] and isinstance(entry["export_errors"], list)
    assert [(c["case"], c["path"]) for c in report["goal_checks"]] == [
        ("infer_b8_224", path) for path in ("eager", "compiled", "onnx")
    ]
    assert f"report written to {out}" in result.stdout
