"""Shared by the Triton backend tests (test_triton_*.py, tests/kernels/test_backend_parity.py). Import after triton.

Triton reads TRITON_INTERPRET once, when it is imported, and importing spatial_mamba imports it (through timm and
torchvision). In a pytest process that imported it without the variable (plain ``pytest tests``), the tests marked
``needs_interpreter`` run in a child pytest started with TRITON_INTERPRET=1 (``assert_interpreted_tests_pass``);
under ``TRITON_INTERPRET=1 pytest tests/ops/test_triton_*.py`` they run in this process instead, and the tests marked
``needs_compiler`` (ahead-of-time compiles for sm_90, which need no GPU) are skipped.
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import triton

from spatial_mamba.ops.backends.triton.selective_scan import triton_is_interpreted

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The interpreted tests of every file carry this in their names, which is how the child pytest selects them.
INTERPRETED_KEYWORD = "interpreted_kernels"

INTERPRETED = triton_is_interpreted()
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="triton was imported without TRITON_INTERPRET=1: run by the child process test"
)
needs_compiler = pytest.mark.skipif(
    INTERPRETED, reason="triton was imported with TRITON_INTERPRET=1: it cannot compile kernels"
)
in_parent_only = pytest.mark.skipif(
    INTERPRETED, reason="triton was imported with TRITON_INTERPRET=1: the interpreted tests run in this process"
)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )


def assert_interpreted_tests_pass(test_file: str, keyword: str = INTERPRETED_KEYWORD):
    """Runs the tests of ``test_file`` selected by ``keyword`` in a child pytest with TRITON_INTERPRET=1; all must
    pass, none may be skipped."""
    args = ["-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", "-k", keyword]
    result = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO, "TRITON_INTERPRET": "1"},
        cwd=REPO,
        timeout=600,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary


def ptxas_report(kernel, signature: dict, constexprs: dict, num_warps: int, workdir) -> str:
    """Compiles ``kernel`` for sm_90 without a GPU and returns ptxas' resource report (registers, spills)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        ptxas = triton.knobs.nvidia.ptxas.path
    except (ImportError, AttributeError):
        pytest.skip(f"triton {triton.__version__} has no ahead-of-time compile API (ASTSource, knobs)")
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps},
    )
    ptx = workdir / f"{kernel.__name__}.ptx"
    ptx.write_text(compiled.asm["ptx"])
    arch = "sm_90a" if ".target sm_90a" in compiled.asm["ptx"] else "sm_90"
    result = subprocess.run(
        [ptxas, f"-arch={arch}", "-v", str(ptx), "-o", str(ptx.with_suffix(".cubin"))], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stderr


def assert_no_spills(report: str):
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", report)
    assert spills and all(count == "0" for count in spills), report
