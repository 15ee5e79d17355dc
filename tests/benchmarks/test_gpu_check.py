"""benchmarks/gpu_check.sh, the first run on a GPU machine: its dry run here (the steps that need no GPU run, the
others are listed as skipped), its refusal to run for real without a GPU, and its failure accounting."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["env", "build", "dispatch", "drift", "memcheck", "racecheck", "pytest", "stages", "benchmark", "ncu"]
GPU_ONLY = {"build", "dispatch", "memcheck", "racecheck", "pytest", "stages", "ncu"}


def _run(*args, **env):
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=900,
    )


def _summary(out: Path) -> dict:
    return {line.split()[0]: line.split()[1] for line in (out / "summary.txt").read_text().splitlines()}


@pytest.mark.slow
def test_dry_run_runs_the_cpu_safe_steps_and_lists_the_others(tmp_path):
    result = _run("--dry-run", tmp_path / "check")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "check"
    summary = _summary(out)
    assert list(summary) == STEPS
    assert {step for step, status in summary.items() if status == "skipped"} == GPU_ONLY
    assert all(status == "ok" for step, status in summary.items() if step not in GPU_ONLY), summary
    assert len(list(out.glob("[0-9][0-9]-*.log"))) == len(STEPS)  # every step's log is kept
    drift = json.loads((out / "drift.json").read_text())
    assert drift["shape"] == [1, 4, 66_600] and {"cpu/float32", "reference/float32"} <= set(drift["errors"])
    assert max(max(errors.values()) for errors in drift["errors"].values()) <= drift["tolerance"]
    assert json.loads((out / "cpu-smoke.json").read_text())["device_type"] == "cpu"


def test_a_failing_step_fails_the_check_and_the_others_still_run(tmp_path):
    result = _run("--dry-run", tmp_path / "check", PYTHON="false")
    assert result.returncode != 0
    summary = _summary(tmp_path / "check")
    assert summary["env"] == "rc=1" and summary["drift"] == "rc=1" and summary["benchmark"] == "rc=1"
    assert "3 step(s) failed" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the real run would start")
def test_a_real_run_without_a_gpu_refuses_and_says_how_to_dry_run(tmp_path):
    result = _run(tmp_path / "check")
    assert result.returncode == 2 and "no CUDA device" in result.stderr and "--dry-run" in result.stderr
    result = _run()
    assert result.returncode == 2 and "usage:" in result.stderr
