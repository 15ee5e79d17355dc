"""The Triton backends' set-up: availability, interpreter mode, compiling the scan kernels for sm_90, and the scan's
split rule.

Their numbers (whole and split rows) are checked against float64 definitions, with the other backends, in
tests/kernels/test_backend_parity.py (in Triton's interpreter when there is no GPU).
"""

import re

import pytest
import torch

from spatial_mamba.ops.backends.triton.selective_scan import triton_installed  # noqa: E402

if not triton_installed()[0]:
    pytest.skip(f"the Triton backend cannot run: {triton_installed()[1]}", allow_module_level=True)

from spatial_mamba.ops import backend  # noqa: E402
from spatial_mamba.ops.backends.triton import selective_scan as triton_scan  # noqa: E402

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
        from spatial_mamba.ops import backend
        from spatial_mamba.ops.backends.triton import selective_scan as triton_scan
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
    _, _, options, _ = triton_scan._launch_config(u)
    constexprs = {
        "HAS_DELTA_BIAS": True,
        "DELTA_SOFTPLUS": True,
        "BLOCK_D": options["BLOCK_D"],
        "BLOCK_L": options["BLOCK_L"],
    }
    bf16_pointers = {"u_ptr", "delta_ptr", "B_ptr", "du_ptr", "ddelta_ptr"}
    integers = ("n_channels", "length", "segment_length", "n_segments")
    kinds = {**dict.fromkeys(integers, "i32"), **dict.fromkeys(constexprs, "constexpr")}
    scan_kernels = [kernels.selective_scan_fwd_kernel, kernels.selective_scan_bwd_kernel]
    scan_kernels += [kernels.selective_scan_fwd_totals_kernel, kernels.selective_scan_bwd_totals_kernel]
    for kernel in scan_kernels:
        signature = {name: kinds.get(name, "*bf16" if name in bf16_pointers else "*fp32") for name in kernel.arg_names}
        assert_no_spills(ptxas_report(kernel, signature, constexprs, triton_scan.NUM_WARPS, tmp_path))


# ------------------------------------------------------------------------------------------------- split rows


def test_split_rule_cuts_only_rows_too_few_for_the_gpu():
    sm = 132  # an H100 or H200
    # Detection (batch 2, D 128, 66,600 tokens): 128 programs of 2 channels, 4 segments of 16,896 positions (512
    # programs, within 4 per SM).
    assert triton_scan.split_segments(2, 128, 66_600, sm) == 4
    assert triton_scan.segment_length(66_600, 4) == 16_896
    # Programs enough for half the target or more, rows of one token, or rows shorter than two minimum segments:
    # not split.
    assert triton_scan.split_segments(128, 128, 3_136, sm) == 1
    assert triton_scan.split_segments(2, 270, 66_600, sm) == 1
    assert triton_scan.split_segments(2, 128, 1, sm) == 1
    assert triton_scan.split_segments(1, 1, 4_095, sm) == 1
    assert triton_scan.split_segments(1, 1, 4_096, sm) == 2
    assert triton_scan.split_segments(1, 1, 10**6, sm) == 32
    with pytest.raises(ValueError, match="sm_count must be a non-negative int; got -1"):
        triton_scan.split_segments(2, 128, 66_600, -1)


@pytest.mark.parametrize("sm_count", [16, 132])
def test_split_rule_gives_valid_segments(sm_count):
    # Segments of whole chunks that cover the row with none empty, at least SPLIT_MIN_SEGMENT long when split; never
    # more programs than the target (one wave), and as many segments as fit in it unless the row length or the cap
    # stops them (whole 256-position chunks per segment cost at most 1 in 9 segments of at least 2,048 positions).
    target = triton_scan.SPLIT_PROGRAMS_PER_SM * sm_count
    for channels in (1, 3, 64, 128, 1_000, 1_056):
        for length in (1, 255, 4_095, 4_096, 4_097, 10_000, 66_600, 200_001):
            segments = triton_scan.split_segments(1, channels, length, sm_count)
            piece = triton_scan.segment_length(length, segments)
            assert 1 <= segments <= triton_scan.MAX_SEGMENTS and piece % min(256, piece) == 0
            assert (segments - 1) * piece < length <= segments * piece, (channels, length, segments, piece)
            programs = -(-channels // triton_scan._tile(channels, length)[0])
            if segments > 1:
                assert piece >= triton_scan.SPLIT_MIN_SEGMENT and programs * segments <= target
            wanted = min(target // programs, triton_scan.MAX_SEGMENTS, length // triton_scan.SPLIT_MIN_SEGMENT)
            assert 9 * segments >= 8 * wanted, (channels, length, segments)


def test_rejects_a_segment_count_the_rows_cannot_take():
    with pytest.raises(ValueError, match="rows of 300 positions cannot be cut into 3 segments"):
        triton_scan._launch_config(torch.empty(1, 2, 300), 3)
