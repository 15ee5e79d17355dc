"""The Triton backends' set-up: availability, interpreter mode, and compiling the scan kernels for sm_90.

Their numbers are checked against float64 definitions, with the other backends, in
tests/kernels/test_backend_parity.py (in Triton's interpreter when there is no GPU).
"""

import re

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")

from spatial_mamba.ops import backend, triton_scan  # noqa: E402

from ._triton_interpreter import (  # noqa: E402
    INTERPRETED,
    assert_no_spills,
    needs_compiler,
    ptxas_report,
    run_python,
)


def test_forced_triton_backend_says_when_interpret_mode_changed_after_import(monkeypatch):
    if INTERPRETED:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        reason = "triton was imported with TRITON_INTERPRET=1, which is no longer set"
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        reason = "TRITON_INTERPRET=1 was set after triton was imported"
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    ok, why = triton_scan.available()
    assert not ok and why.startswith(reason), why
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        backend.select("selective_scan", torch.zeros(1, 1, 1))


def test_triton_backends_report_unavailable_without_triton():
    # The modules must import without Triton, and each backend must say why it cannot run.
    code = """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        from spatial_mamba.ops import backend, triton_scan
        print(triton_scan.available())
        print(backend.describe()["selective_scan"]["triton"])
        print(backend.describe()["dwconv2d"]["triton"])
        print(backend.describe()["state_fusion"]["triton"])
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        "(False, 'triton is not installed')",
        "unavailable: triton is not installed",
        "unavailable: triton is not installed",
        "unavailable: triton is not installed",
    ]


@needs_compiler
@pytest.mark.parametrize("length", [49, 3136])  # the last and first stage of Spatial-Mamba-T at 224x224
def test_kernels_compile_for_hopper_without_register_spills(tmp_path, length):
    # The interpreter accepts code that the GPU compiler rejects: compile the real kernels for sm_90 (no GPU needed).
    kernels = triton_scan._kernels()
    u = torch.empty(2, 384, length, dtype=torch.bfloat16)
    _, _, options = triton_scan._launch_config(u)
    constexprs = {
        "HAS_DELTA_BIAS": True,
        "DELTA_SOFTPLUS": True,
        "BLOCK_D": options["BLOCK_D"],
        "BLOCK_L": options["BLOCK_L"],
    }
    bf16_pointers = {"u_ptr", "delta_ptr", "B_ptr", "du_ptr", "ddelta_ptr"}
    kinds = {"n_channels": "i32", "length": "i32", **dict.fromkeys(constexprs, "constexpr")}
    for kernel in (kernels.selective_scan_fwd_kernel, kernels.selective_scan_bwd_kernel):
        signature = {name: kinds.get(name, "*bf16" if name in bf16_pointers else "*fp32") for name in kernel.arg_names}
        assert_no_spills(ptxas_report(kernel, signature, constexprs, triton_scan.NUM_WARPS, tmp_path))
