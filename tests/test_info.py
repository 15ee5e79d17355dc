"""``python -m spatial_mamba.info`` says which backend each op uses and why."""

import os
import re
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
    section = out.split("dwconv2d:")[1]
    assert "reference available" in section
    assert "-> on CPU tensors: reference" in section
    if "CUDA available: False" in out:
        assert "no GPU here" in out


def test_info_lists_the_cpu_kernels_of_the_fusion_ops_and_the_scan():
    out = _info(SPATIAL_MAMBA_BACKEND="")
    for op in ("state_fusion", "fused_observation", "selective_scan"):
        section = re.split(r"\n(?=\S)", out.split(f"{op}:")[1])[0]
        assert re.search(r"\n  cpu +(available: compiled CPU kernels|unavailable: )", section), section
        # Float32 CPU tensors take the kernels, or the reference with the reason they cannot run.
        assert re.search(r"-> on CPU tensors: (cpu \(|reference \(CPU tensors; not cpu: )", section), section
    forced = _info(SPATIAL_MAMBA_BACKEND="reference").split("state_fusion:")[1]
    assert "-> on CPU tensors: reference (forced by SPATIAL_MAMBA_BACKEND=reference)" in forced


def test_info_reports_a_forced_backend_that_cannot_run():
    out = _info(SPATIAL_MAMBA_BACKEND="cuda")
    assert "SPATIAL_MAMBA_BACKEND=cuda" in out
    if "CUDA available: False" in out:
        assert "-> on CPU tensors: error: SPATIAL_MAMBA_BACKEND=cuda was asked for" in out
