"""FLOPs and parameters counted like the official code."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "variant,params,gflops",
    [("spatial_mamba_tiny", 26748862, "4.47"), ("spatial_mamba_small", 43074280, "7.12"),
     ("spatial_mamba_base", 95745592, "15.80")],
)  # fmt: skip
def test_flops_tool_prints_the_official_counts(variant, params, gflops):
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "flops.py"), "--model", variant],
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout.strip().splitlines()  # fmt: skip
    assert out[-1] == f"{variant} params={params} gflops={gflops}"
