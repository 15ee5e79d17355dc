"""``python -m spatial_mamba.info`` says which backend each op uses and why."""

import os
import subprocess
import sys


def _info(**env):
    result = subprocess.run(
        [sys.executable, "-m", "spatial_mamba.info"], capture_output=True, text=True, timeout=300,
        env={**os.environ, **env}, check=True,
    )  # fmt: skip
    return result.stdout


def test_info_lists_every_op_with_its_cpu_backend_and_reasons():
    out = _info(SPATIAL_MAMBA_BACKEND="")
    for op in ("selective_scan", "dwconv2d"):
        section = out.split(f"{op}:")[1]
        assert "reference available" in section
        assert "-> on CPU tensors: reference" in section
    if "CUDA available: False" in out:
        assert "no GPU here" in out


def test_info_reports_a_forced_backend_that_cannot_run():
    out = _info(SPATIAL_MAMBA_BACKEND="cuda")
    assert "SPATIAL_MAMBA_BACKEND=cuda" in out
    if "CUDA available: False" in out:
        assert "-> on CPU tensors: error: SPATIAL_MAMBA_BACKEND=cuda was asked for" in out
